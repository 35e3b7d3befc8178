//! A small in-memory Kubernetes API for reconcile tests (over `tower-test`): objects stored by
//! path; server-side apply and merge patches applied as JSON merges, JSON patches as JSON patches;
//! lists filtered by label selector; every request recorded; faults injectable per request.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};

/// A request the fake saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub body: Option<Value>,
}

/// A status to answer with instead of handling a request.
#[derive(Debug, Clone)]
pub struct Fault {
    pub method: Method,
    pub path_contains: String,
    pub code: u16,
    pub reason: String,
    /// How many matching requests fail (then the fault is spent).
    pub times: usize,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    seen: Vec<Seen>,
    faults: Vec<Fault>,
    counter: u64,
    /// Per object and field manager: the top-level status fields it applied last.
    status_owners: BTreeMap<(String, String), Vec<String>>,
}

/// The fake API server; clone handles share state.
#[derive(Clone, Default)]
pub struct FakeApi(Arc<Mutex<State>>);

impl FakeApi {
    /// A kube client talking to this fake.
    pub fn client(&self) -> kube::Client {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let me = self.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let body = serde_json::from_slice::<Value>(&bytes).ok();
                let content_type = parts
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let (code, value) = me.handle(
                    parts.method,
                    parts.uri.path(),
                    parts.uri.query().unwrap_or(""),
                    &content_type,
                    body,
                );
                let resp = Response::builder()
                    .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&value).unwrap_or_default()))
                    .expect("a valid response");
                send.send_response(resp);
            }
        });
        kube::Client::new(service, "default")
    }

    pub fn insert(&self, path: &str, value: Value) {
        self.0
            .lock()
            .unwrap()
            .objects
            .insert(path.to_string(), value);
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.0.lock().unwrap().objects.get(path).cloned()
    }

    pub fn paths(&self) -> Vec<String> {
        self.0.lock().unwrap().objects.keys().cloned().collect()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.0.lock().unwrap().seen.clone()
    }

    /// Every matching request fails from now on.
    pub fn fail(&self, method: Method, path_contains: &str, code: u16, reason: &str) {
        self.fail_times(method, path_contains, code, reason, usize::MAX);
    }

    /// The next `times` matching requests fail.
    pub fn fail_times(
        &self,
        method: Method,
        path_contains: &str,
        code: u16,
        reason: &str,
        times: usize,
    ) {
        self.0.lock().unwrap().faults.push(Fault {
            method,
            path_contains: path_contains.into(),
            code,
            reason: reason.into(),
            times,
        });
    }

    fn status(code: u16, reason: &str, message: String) -> (u16, Value) {
        (
            code,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code}),
        )
    }

    fn handle(
        &self,
        method: Method,
        path: &str,
        query: &str,
        content_type: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut st = self.0.lock().unwrap();
        st.seen.push(Seen {
            method: method.clone(),
            path: path.into(),
            query: query.into(),
            body: body.clone(),
        });
        if let Some(f) = st
            .faults
            .iter_mut()
            .find(|f| f.method == method && path.contains(&f.path_contains) && f.times > 0)
        {
            f.times -= 1;
            let (code, reason) = (f.code, f.reason.clone());
            return Self::status(
                code,
                &reason,
                format!("injected {code} for {method} {path}"),
            );
        }
        // Events are accepted and forgotten.
        if path.contains("/events") {
            return (201, body.unwrap_or(json!({})));
        }
        let (base, sub) = match path.rsplit_once('/') {
            Some((b, s)) if s == "status" || s == "scale" => (b.to_string(), Some(s.to_string())),
            _ => (path.to_string(), None),
        };
        let selector = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("labelSelector="))
            .map(percent_decode);
        st.counter += 1;
        let rv = st.counter.to_string();
        match method {
            Method::GET if st.objects.contains_key(&base) => {
                let obj = st.objects[&base].clone();
                match sub.as_deref() {
                    Some("scale") => (200, scale_of(&obj)),
                    _ => (200, obj),
                }
            }
            Method::GET if is_collection(&base) => {
                (200, list(&st.objects, &base, selector.as_deref()))
            }
            Method::GET => Self::status(404, "NotFound", format!("{base} not found")),
            Method::POST => {
                let mut obj = body.unwrap_or(json!({}));
                let name = obj["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let key = format!("{base}/{name}");
                if st.objects.contains_key(&key) {
                    return Self::status(409, "AlreadyExists", format!("{key} already exists"));
                }
                stamp(&mut obj, &rv, true);
                st.objects.insert(key, obj.clone());
                (201, obj)
            }
            Method::PATCH => {
                let existing = st.objects.get(&base).cloned();
                let mut obj = match (&existing, content_type) {
                    (Some(o), _) => o.clone(),
                    (None, ct) if ct.contains("apply-patch") => json!({}),
                    (None, _) => return Self::status(404, "NotFound", format!("{base} not found")),
                };
                let patch = body.unwrap_or(json!({}));
                if content_type.contains("json-patch") {
                    // Like the API server, a `test` for null passes when the path is absent.
                    let ops: Vec<Value> = patch
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|op| {
                            !(op["op"] == "test"
                                && op["value"].is_null()
                                && op["path"]
                                    .as_str()
                                    .is_some_and(|p| obj.pointer(p).is_none()))
                        })
                        .collect();
                    let Ok(p) = serde_json::from_value::<json_patch::Patch>(Value::Array(ops))
                    else {
                        return Self::status(400, "BadRequest", "bad JSON patch".into());
                    };
                    if json_patch::patch(&mut obj, &p).is_err() {
                        return Self::status(422, "Invalid", "JSON patch test failed".into());
                    }
                } else if sub.as_deref() == Some("scale") {
                    obj["spec"]["replicas"] = patch["spec"]["replicas"].clone();
                } else if sub.as_deref() == Some("status") {
                    // Server-side apply per field manager, at the top level of status: a
                    // manager's apply sets its fields and removes those it applied before and
                    // left out, unless another manager also owns them.
                    let manager = query
                        .split('&')
                        .find_map(|kv| kv.strip_prefix("fieldManager="))
                        .unwrap_or_default()
                        .to_string();
                    let fields: Vec<String> = patch["status"]
                        .as_object()
                        .map(|m| m.keys().cloned().collect())
                        .unwrap_or_default();
                    let before = st
                        .status_owners
                        .insert((base.clone(), manager.clone()), fields.clone())
                        .unwrap_or_default();
                    if !obj["status"].is_object() {
                        obj["status"] = json!({});
                    }
                    for gone in before.iter().filter(|f| !fields.contains(f)) {
                        let shared = st
                            .status_owners
                            .iter()
                            .any(|((b, m), fs)| *b == base && *m != manager && fs.contains(gone));
                        if !shared && let Some(o) = obj["status"].as_object_mut() {
                            o.remove(gone);
                        }
                    }
                    for f in &fields {
                        obj["status"][f] = patch["status"][f].clone();
                    }
                } else {
                    json_patch::merge(&mut obj, &patch);
                }
                stamp(&mut obj, &rv, existing.is_none());
                // Finalizers gone from an object being deleted: it goes.
                let deleting = obj["metadata"]["deletionTimestamp"].is_string();
                let no_finalizers = obj["metadata"]["finalizers"]
                    .as_array()
                    .is_none_or(|f| f.is_empty());
                if deleting && no_finalizers {
                    st.objects.remove(&base);
                } else {
                    st.objects.insert(base.clone(), obj.clone());
                }
                match sub.as_deref() {
                    Some("scale") => (200, scale_of(&obj)),
                    _ => (200, obj),
                }
            }
            Method::DELETE if st.objects.contains_key(&base) => {
                let obj = st.objects.remove(&base).unwrap_or_default();
                (200, obj)
            }
            Method::DELETE if is_collection(&base) => {
                let doomed: Vec<String> = st
                    .objects
                    .iter()
                    .filter(|(k, v)| in_collection(k, &base) && matches(v, selector.as_deref()))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in doomed {
                    st.objects.remove(&k);
                }
                (
                    200,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}),
                )
            }
            Method::DELETE => Self::status(404, "NotFound", format!("{base} not found")),
            _ => Self::status(405, "MethodNotAllowed", format!("{method} {path}")),
        }
    }
}

/// Paths of collections end in a plural resource: the segment after a version or namespace.
fn is_collection(path: &str) -> bool {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    // /api/v1/<res>, /api/v1/namespaces/<ns>/<res>, /apis/<g>/<v>/<res>, /apis/<g>/<v>/namespaces/<ns>/<res>
    match segs.first() {
        Some(&"api") => segs.len() == 3 || (segs.len() == 5 && segs[2] == "namespaces"),
        Some(&"apis") => segs.len() == 4 || (segs.len() == 6 && segs[3] == "namespaces"),
        _ => false,
    }
}

fn in_collection(key: &str, collection: &str) -> bool {
    key.strip_prefix(collection)
        .is_some_and(|rest| rest.starts_with('/') && rest[1..].split('/').count() == 1)
}

fn matches(obj: &Value, selector: Option<&str>) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    sel.split(',').all(|term| match term.split_once('=') {
        Some((k, v)) => obj["metadata"]["labels"][k].as_str() == Some(v),
        None => obj["metadata"]["labels"].get(term).is_some(),
    })
}

fn list(objects: &BTreeMap<String, Value>, collection: &str, selector: Option<&str>) -> Value {
    let items: Vec<Value> = objects
        .iter()
        .filter(|(k, v)| in_collection(k, collection) && matches(v, selector))
        .map(|(_, v)| v.clone())
        .collect();
    json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items})
}

fn stamp(obj: &mut Value, rv: &str, created: bool) {
    let meta = &mut obj["metadata"];
    meta["resourceVersion"] = json!(rv);
    if created || meta["uid"].is_null() {
        meta["uid"] = json!(format!("uid-{rv}"));
        meta["generation"] = json!(1);
        meta["creationTimestamp"] = json!("2026-11-27T00:00:00Z");
    }
}

fn scale_of(obj: &Value) -> Value {
    json!({
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": obj["metadata"]["name"], "namespace": obj["metadata"]["namespace"]},
        "spec": {"replicas": obj["spec"]["replicas"].as_i64().unwrap_or(0)},
        "status": {"replicas": obj["status"]["replicas"].as_i64().unwrap_or(0)}
    })
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}
