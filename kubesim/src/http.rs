//! The HTTP front: authentication, fault injection, routing of Kubernetes API paths to a cluster's
//! verbs, JSON/YAML bodies, tables for kubectl, and streaming watches.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::cluster::{Cluster, Faults, PatchType, WatchEvent, WriteOptions};
use crate::discovery;
use crate::error::ApiError;
use crate::resources::ResourceType;
use crate::routes::Shared;
use crate::selector::{FieldSelector, LabelSelector};
use crate::wire::{
    Body, PATCH_TYPES, content_type, full, json_response, manager, parse_body, read_body,
};

fn error_response(err: &ApiError) -> Response<Body> {
    json_response(
        StatusCode::from_u16(err.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &err.status(),
    )
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(
                    std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"),
                    16,
                ) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// Entry point for every request.
pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let query = parse_query(req.uri().query());
    let (cluster, rest) = match shared.route_cluster(&path) {
        Some(found) => found,
        None => return Ok(error_response(&ApiError::not_found_path(&path))),
    };
    let segments: Vec<String> = rest
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect();
    let public = matches!(
        segments.first().map(String::as_str),
        Some("healthz" | "readyz" | "livez" | "version")
    );
    if !public && !shared.authorized(req.headers()) {
        return Ok(error_response(&ApiError::unauthorized()));
    }
    let faults = cluster.faults();
    if faults.unresponsive {
        // A cluster that stopped answering: hold the request until the client gives up or we stop.
        shared.shutdown.cancelled().await;
        return Ok(error_response(&ApiError::internal(
            "kubesim is shutting down",
        )));
    }
    if faults.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
    }
    let is_watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    if faults.error_rate > 0.0
        && !is_watch
        && segments.first().map(String::as_str) != Some("kubesim")
    {
        let roll =
            f64::from(u32::from_le_bytes(crate::meta::random_bytes::<4>())) / f64::from(u32::MAX);
        if roll < faults.error_rate {
            let err = if roll < faults.error_rate / 2.0 {
                ApiError::too_many_requests()
            } else {
                ApiError::internal("injected by kubesim")
            };
            let mut response = error_response(&err);
            if err.code == 429 {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            }
            return Ok(response);
        }
    }
    let response = match route(&shared, &cluster, req, &segments, &query).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    Ok(response)
}

fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"))
}

async fn route(
    shared: &Arc<Shared>,
    cluster: &Arc<Cluster>,
    req: Request<Incoming>,
    seg: &[String],
    query: &HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let s: Vec<&str> = seg.iter().map(String::as_str).collect();
    let method = req.method().clone();
    let types = cluster.types();
    let ok = |v: Value| Ok(json_response(StatusCode::OK, &v));
    match s.as_slice() {
        ["version"] => return ok(discovery::version()),
        ["healthz" | "readyz" | "livez"] => {
            let mut r = Response::new(full("ok"));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain"),
            );
            return Ok(r);
        }
        ["api"] => return ok(discovery::api_versions()),
        ["apis"] => return ok(discovery::api_group_list(&types)),
        ["api", "v1"] => {
            return discovery::resource_list(&types, "", "v1")
                .map_or_else(|| Err(ApiError::not_found_path("/api/v1")), ok);
        }
        ["apis", g] => {
            return discovery::api_group(&types, g)
                .map_or_else(|| Err(ApiError::not_found_path(&format!("/apis/{g}"))), ok);
        }
        ["apis", g, v] => {
            return discovery::resource_list(&types, g, v).map_or_else(
                || Err(ApiError::not_found_path(&format!("/apis/{g}/{v}"))),
                ok,
            );
        }
        ["openapi", "v3"] => return ok(discovery::openapi_v3_index(&types)),
        ["openapi", "v3", rest @ ..] => {
            let gv = rest.join("/");
            return discovery::openapi_v3_group_version(&types, &gv).map_or_else(
                || Err(ApiError::not_found_path(&format!("/openapi/v3/{gv}"))),
                ok,
            );
        }
        ["kubesim", "v1", "faults"] => {
            if method == Method::PUT || method == Method::POST {
                let (_, bytes) = read_body(req).await?;
                let faults: Faults = serde_json::from_slice(&bytes)
                    .map_err(|e| ApiError::bad_request(format!("faults: {e}")))?;
                cluster.set_faults(faults);
            }
            return ok(serde_json::to_value(cluster.faults()).unwrap_or_default());
        }
        ["kubesim", "v1", "drop-watches"] => {
            cluster.drop_all_watches();
            return ok(json!({"dropped": true}));
        }
        _ => {}
    }
    let (group, version, rest): (&str, &str, &[&str]) = match s.as_slice() {
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", g, v, rest @ ..] => (g, v, rest),
        _ => return Err(ApiError::not_found_path(&format!("/{}", s.join("/")))),
    };
    // namespaces/{ns}/{plural}[/{name}[/{sub}]] unless it is a namespace's own subresource.
    let (ns, plural, name, sub): (Option<&str>, &str, Option<&str>, Option<&str>) = match rest {
        ["namespaces", ns, sub @ ("status" | "finalize")] if group.is_empty() => {
            (None, "namespaces", Some(ns), Some(sub))
        }
        ["namespaces", ns, plural] => (Some(ns), plural, None, None),
        ["namespaces", ns, plural, name] => (Some(ns), plural, Some(name), None),
        ["namespaces", ns, plural, name, sub] => (Some(ns), plural, Some(name), Some(sub)),
        [plural] => (None, plural, None, None),
        [plural, name] => (None, plural, Some(name), None),
        [plural, name, sub] => (None, plural, Some(name), Some(sub)),
        _ => return Err(ApiError::not_found_path(&format!("/{}", s.join("/")))),
    };
    let rt = cluster
        .resolve(group, version, plural)
        .ok_or_else(|| ApiError::not_found_path(&format!("/{}", s.join("/"))))?;
    if ns.is_some() && !rt.namespaced {
        return Err(ApiError::not_found_path(&format!("/{}", s.join("/"))));
    }
    let sub = match sub {
        None => None,
        Some("status") if rt.status => Some("status".to_string()),
        Some("finalize") if rt.kind == "Namespace" => Some("finalize".to_string()),
        Some("scale") if crate::scale::scalable(&rt) => {
            let name = name.ok_or_else(|| ApiError::not_found_path(&rt.plural))?;
            return crate::scale::serve(cluster, &rt, ns, name, method, req, query).await;
        }
        // No container ever runs here: say so at once instead of letting a client wait.
        Some("log" | "exec" | "attach" | "portforward" | "proxy") if rt.kind == "Pod" => {
            let pod = name.unwrap_or_default();
            cluster.get(&rt, ns, pod)?;
            return Err(ApiError::bad_request(format!(
                "kubesim runs no containers: pods/{} of {pod:?} is not available",
                sub.unwrap_or_default()
            )));
        }
        Some(other) => return Err(ApiError::not_found_path(&format!("{}/{other}", rt.plural))),
    };
    let dry_run = query.get("dryRun").is_some_and(|v| v == "All");
    let headers = req.headers().clone();
    let opts = WriteOptions {
        manager: manager(query, &headers),
        dry_run,
        subresource: sub.clone().filter(|s| s == "status"),
    };
    match (method, name) {
        (Method::GET, None) => {
            let labels =
                LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))?;
            let fields =
                FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))?;
            if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
                return watch(shared, cluster, &rt, ns, labels, fields, query);
            }
            let limit = query
                .get("limit")
                .and_then(|l| l.parse::<usize>().ok())
                .filter(|l| *l > 0);
            let cont = query
                .get("continue")
                .filter(|c| !c.is_empty())
                .map(|c| decode_continue(c))
                .transpose()?;
            let (items, rv, next) = cluster.list(
                &rt,
                ns,
                |o| labels.matches(&o["metadata"]["labels"]) && fields.matches(o),
                limit,
                cont.as_deref(),
            );
            if wants_table(&headers) {
                return ok(table(&items, rv));
            }
            let builtin = crate::resources::is_builtin(&rt.group, &rt.plural);
            let items: Vec<Value> = items
                .into_iter()
                .map(|mut o| {
                    if builtin && let Some(m) = o.as_object_mut() {
                        m.remove("apiVersion");
                        m.remove("kind");
                    }
                    o
                })
                .collect();
            let mut metadata = json!({"resourceVersion": rv.to_string()});
            if let Some(next) = next {
                metadata["continue"] = json!(encode_continue(&next));
            }
            ok(
                json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(), "metadata": metadata, "items": items}),
            )
        }
        (Method::GET, Some(name)) => {
            let obj = cluster.get(&rt, ns, name)?;
            if wants_table(&headers) {
                return ok(table(
                    std::slice::from_ref(&obj),
                    cluster.resource_version(),
                ));
            }
            ok(obj)
        }
        (Method::POST, None) => {
            let (headers, bytes) = read_body(req).await?;
            let body = parse_body(&bytes, content_type(&headers).contains("yaml"))?;
            let created = cluster.create(&rt, ns, body, &opts)?;
            Ok(json_response(StatusCode::CREATED, &created))
        }
        (Method::PUT, Some(name)) => {
            let (headers, bytes) = read_body(req).await?;
            let body = parse_body(&bytes, content_type(&headers).contains("yaml"))?;
            ok(cluster.update(&rt, ns, name, body, &opts)?)
        }
        (Method::PATCH, Some(name)) => {
            let (headers, bytes) = read_body(req).await?;
            let ct = content_type(&headers);
            let kind = match ct.as_str() {
                "application/json-patch+json" => PatchType::Json,
                "application/merge-patch+json" => PatchType::Merge,
                "application/strategic-merge-patch+json" => PatchType::Strategic,
                "application/apply-patch+yaml" | "application/apply-patch+cbor" => {
                    if opts.manager.is_empty() || !query.contains_key("fieldManager") {
                        return Err(ApiError::invalid(
                            "PatchOptions.meta.k8s.io",
                            "",
                            vec![(
                                "fieldManager".into(),
                                "Required value: is required for apply patch".into(),
                            )],
                        ));
                    }
                    PatchType::Apply {
                        force: query.get("force").is_some_and(|f| f == "true"),
                    }
                }
                other => return Err(ApiError::unsupported_media_type(other, &PATCH_TYPES)),
            };
            let body = parse_body(&bytes, ct.contains("yaml"))?;
            let (obj, created) = cluster.patch(&rt, ns, name, kind, body, &opts)?;
            Ok(json_response(
                if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                },
                &obj,
            ))
        }
        (Method::DELETE, Some(name)) => {
            let (headers, bytes) = read_body(req).await?;
            let mut options = parse_body(&bytes, content_type(&headers).contains("yaml"))?;
            if options.is_null() {
                options = json!({});
            }
            if let Some(p) = query.get("propagationPolicy") {
                options["propagationPolicy"] = json!(p);
            }
            let result = cluster.delete(&rt, ns, name, &options, dry_run)?;
            let code = if result["kind"] == "Status" {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            Ok(json_response(code, &result))
        }
        (Method::DELETE, None) => {
            let labels =
                LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))?;
            let fields =
                FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))?;
            let mut options = json!({});
            if let Some(p) = query.get("propagationPolicy") {
                options["propagationPolicy"] = json!(p);
            }
            cluster.delete_collection(
                &rt,
                ns,
                |o| labels.matches(&o["metadata"]["labels"]) && fields.matches(o),
                &options,
            );
            ok(json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}))
        }
        (m, _) => Err(ApiError::method_not_allowed(format!(
            "{m} is not supported on {}",
            rt.plural
        ))),
    }
}

fn encode_continue(position: &str) -> String {
    position.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_continue(token: &str) -> Result<String, ApiError> {
    let bad = || ApiError::bad_request(format!("invalid continue token {token:?}"));
    if !token.len().is_multiple_of(2) {
        return Err(bad());
    }
    let bytes: Result<Vec<u8>, _> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&token[i..i + 2], 16))
        .collect();
    String::from_utf8(bytes.map_err(|_| bad())?).map_err(|_| bad())
}

fn age(created: &str) -> String {
    let Ok(t) = humantime::parse_rfc3339(created) else {
        return "<unknown>".into();
    };
    let secs = std::time::SystemTime::now()
        .duration_since(t)
        .unwrap_or_default()
        .as_secs();
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// A `meta.k8s.io/v1 Table` with Name and Age columns, which is what kubectl's default output asks for.
fn table(items: &[Value], rv: u64) -> Value {
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            json!({"cells": [o["metadata"]["name"], age(o["metadata"]["creationTimestamp"].as_str().unwrap_or(""))],
                   "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv.to_string()},
           "columnDefinitions": [
               {"name": "Name", "type": "string", "format": "name", "description": "Name must be unique within a namespace.", "priority": 0},
               {"name": "Age", "type": "string", "format": "", "description": "CreationTimestamp", "priority": 0}],
           "rows": rows})
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn watch(
    shared: &Arc<Shared>,
    cluster: &Arc<Cluster>,
    rt: &ResourceType,
    ns: Option<&str>,
    labels: LabelSelector,
    fields: FieldSelector,
    query: &HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let send_initial = query.get("sendInitialEvents").is_some_and(|v| v == "true");
    let rv = match query.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {v:?}")))?,
        ),
    };
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let start = match cluster.watch(rt, ns, if send_initial { None } else { rv }) {
        Ok(start) => start,
        Err(gone) => {
            // The API server reports an expired resourceVersion as an ERROR event in a 200 stream.
            let body = full(event_line("ERROR", &gone.status()));
            let mut r = Response::new(body);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            return Ok(r);
        }
    };
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
    let task = WatchTask {
        rt: rt.clone(),
        ns: ns.map(str::to_string),
        labels,
        fields,
        bookmarks,
        send_initial,
        timeout,
        drop: cluster.drop_watches.subscribe(),
        shutdown: shared.shutdown.clone(),
    };
    shared.tasks.spawn(task.run(start, tx));
    let mut response = Response::new(StreamBody::new(ReceiverStream::new(rx)).boxed());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// How often an idle watch with bookmarks enabled gets one.
const BOOKMARK_EVERY: Duration = Duration::from_secs(5);

/// One open watch: filters a cluster's events for its type, namespace and selectors.
struct WatchTask {
    rt: ResourceType,
    ns: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    bookmarks: bool,
    send_initial: bool,
    timeout: Duration,
    drop: tokio::sync::watch::Receiver<u64>,
    shutdown: tokio_util::sync::CancellationToken,
}

impl WatchTask {
    fn in_scope(&self, e: &WatchEvent) -> bool {
        let (group, plural) = self.rt.storage_key();
        e.group == group
            && e.plural == plural
            && self
                .ns
                .as_deref()
                .is_none_or(|n| !self.rt.namespaced || e.namespace == n)
    }

    fn selects(&self, object: &Value) -> bool {
        self.labels.matches(&object["metadata"]["labels"]) && self.fields.matches(object)
    }

    /// What this watcher sees of an event, as the API server's watch cache decides it: a change
    /// that makes an object match is ADDED, one that makes it stop matching is DELETED (with the
    /// object as it was, at the event's resourceVersion), anything else passes only if it matches.
    fn translate(&self, e: &WatchEvent) -> Option<(&'static str, Value)> {
        if !self.in_scope(e) {
            return None;
        }
        if e.kind != "MODIFIED" {
            return self.selects(&e.object).then(|| (e.kind, e.object.clone()));
        }
        let now = self.selects(&e.object);
        let before = e.prev.as_ref().is_some_and(|p| self.selects(p));
        match (before, now) {
            (true, true) => Some(("MODIFIED", e.object.clone())),
            (false, true) => Some(("ADDED", e.object.clone())),
            (true, false) => {
                let mut old = e.prev.clone().unwrap_or_default();
                old["metadata"]["resourceVersion"] = json!(e.rv.to_string());
                Some(("DELETED", old))
            }
            (false, false) => None,
        }
    }

    fn line(&self, kind: &str, object: &Value) -> Result<Frame<Bytes>, Infallible> {
        let mut object = object.clone();
        object["apiVersion"] = json!(self.rt.api_version());
        object["kind"] = json!(self.rt.kind);
        Ok(Frame::data(event_line(kind, &object)))
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Result<Frame<Bytes>, Infallible> {
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        self.line("BOOKMARK", &json!({"metadata": metadata}))
    }

    async fn run(
        mut self,
        start: crate::cluster::WatchStart,
        tx: mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
    ) {
        for event in &start.initial {
            if let Some((kind, object)) = self.translate(event)
                && tx.send(self.line(kind, &object)).await.is_err()
            {
                return;
            }
        }
        let mut last_rv = start.rv;
        if self.send_initial && tx.send(self.bookmark(last_rv, true)).await.is_err() {
            return;
        }
        let mut rx = start.rx;
        let deadline = tokio::time::sleep(self.timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval(BOOKMARK_EVERY);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = self.shutdown.cancelled() => return,
                _ = self.drop.changed() => return,
                _ = tx.closed() => return,
                _ = ticker.tick(), if self.bookmarks => {
                    if tx.send(self.bookmark(last_rv, false)).await.is_err() {
                        return;
                    }
                }
                event = rx.recv() => match event {
                    Ok(event) => {
                        if event.rv <= start.rv {
                            continue;
                        }
                        last_rv = event.rv;
                        if let Some((kind, object)) = self.translate(&event)
                            && tx.send(self.line(kind, &object)).await.is_err()
                        {
                            return;
                        }
                    }
                    // A watcher that fell behind is closed; the client resumes from its last
                    // resourceVersion (or re-lists on 410), as with a real API server.
                    Err(_) => return,
                },
            }
        }
    }
}
