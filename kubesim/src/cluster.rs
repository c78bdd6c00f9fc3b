//! One simulated cluster: its objects, resourceVersions, watch history, and the verbs of the API.
//!
//! All state sits behind one mutex, held only for the in-memory work of a request, so every write
//! gets the next resourceVersion in one total order per cluster, exactly like etcd behind a real API
//! server. Watchers get events through a broadcast channel; a bounded history serves watches that
//! resume from an older resourceVersion, and anything older is `410 Gone`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{Notify, broadcast};

use crate::controllers;
use crate::error::ApiError;
use crate::meta::{self, spec_part};
use crate::patch;
use crate::resources::{self, ResourceType};
use crate::ssa::{self, Writer};

/// (group, plural, namespace, name); namespace is "" for cluster-scoped objects.
pub type ObjKey = (String, String, String, String);

/// Tunables of a simulated cluster.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// How long workloads take to become ready.
    pub ready_delay: Duration,
    /// Events kept for watches resuming from an older resourceVersion.
    pub history: usize,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            ready_delay: Duration::from_millis(300),
            history: 2048,
        }
    }
}

/// Injected faults, changed at runtime through the admin endpoint.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Faults {
    /// Added to every request.
    pub latency_ms: u64,
    /// Fraction of non-watch requests answered 500 or 429.
    pub error_rate: f64,
    /// The cluster stops answering (requests hang).
    pub unresponsive: bool,
}

/// The annotation the Deployment controller numbers ReplicaSets (and its Deployment) with.
const REVISION_ANNOTATION: &str = "deployment.kubernetes.io/revision";

/// A pod template's hash, in the alphabet Kubernetes uses for generated names (FNV-1a over the
/// template's JSON, whose keys serde_json keeps sorted).
fn template_hash(template: &Value) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    // Absent, null and empty are one thing to the real controller (it hashes a Go struct).
    fn normalize(v: &mut Value) {
        if let Value::Object(m) = v {
            m.remove("creationTimestamp");
            m.values_mut().for_each(normalize);
            m.retain(|_, x| !x.is_null() && x.as_object().is_none_or(|o| !o.is_empty()));
        } else if let Value::Array(items) = v {
            items.iter_mut().for_each(normalize);
        }
    }
    let mut t = template.clone();
    normalize(&mut t);
    if let Some(labels) = t["metadata"]["labels"].as_object_mut() {
        labels.remove("pod-template-hash");
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in t.to_string().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (0..10)
        .map(|i| {
            let digit = (h >> (i * 6)) as usize % ALPHABET.len();
            char::from(ALPHABET[digit])
        })
        .collect()
}

/// Simulated nodes per cluster.
const NODES: usize = 3;

/// Simulated node `i` (1-based): Ready, with capacity, in zone a, b or c.
fn node(i: usize) -> Value {
    let name = format!("kubesim-node-{i}");
    let zone = ["a", "b", "c"][(i - 1) % 3];
    let now = meta::now();
    let capacity =
        json!({"cpu": "4", "memory": "16Gi", "pods": "110", "ephemeral-storage": "100Gi"});
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "topology.kubernetes.io/zone": format!("zone-{zone}"),
            "topology.kubernetes.io/region": "kubesim",
        }},
        "spec": {},
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "message": "kubelet is posting ready status (simulated)",
                 "lastHeartbeatTime": now, "lastTransitionTime": now},
            ],
            "addresses": [{"type": "InternalIP", "address": format!("10.0.0.{}", 10 + i)},
                          {"type": "Hostname", "address": name}],
            "nodeInfo": {"kubeletVersion": "v1.32.0", "containerRuntimeVersion": "kubesim://0",
                         "operatingSystem": "linux", "architecture": "amd64"},
        },
    })
}

/// One change, as watchers see it.
#[derive(Debug)]
pub struct WatchEvent {
    pub rv: u64,
    pub group: String,
    pub plural: String,
    pub namespace: String,
    pub kind: &'static str,
    pub object: Value,
    /// For MODIFIED: the object before the change, so a selector watch can tell an object that
    /// stopped (or started) matching, as the API server's watch cache does.
    pub prev: Option<Value>,
}

/// Where a watch starts.
pub struct WatchStart {
    pub initial: Vec<Arc<WatchEvent>>,
    pub rx: broadcast::Receiver<Arc<WatchEvent>>,
    pub rv: u64,
}

struct State {
    rv: u64,
    types: Vec<ResourceType>,
    objects: BTreeMap<ObjKey, Value>,
    history: VecDeque<Arc<WatchEvent>>,
    compacted_rv: u64,
    pending: BTreeSet<(Instant, ObjKey)>,
}

/// Options common to writes.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    pub manager: String,
    pub dry_run: bool,
    pub subresource: Option<String>,
}

/// How a PATCH body is to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    Strategic,
    /// Server-side apply.
    Apply {
        force: bool,
    },
}

/// A simulated cluster.
pub struct Cluster {
    pub name: String,
    state: Mutex<State>,
    events: broadcast::Sender<Arc<WatchEvent>>,
    faults: Mutex<Faults>,
    /// Wakes the simulated controllers.
    pub(crate) wake: Notify,
    /// Ends every open watch when it changes (fault injection).
    pub(crate) drop_watches: tokio::sync::watch::Sender<u64>,
    pub settings: ClusterSettings,
}

impl Cluster {
    /// A fresh cluster with the namespaces every cluster has.
    pub fn new(name: &str, settings: ClusterSettings) -> Arc<Self> {
        let (events, _) = broadcast::channel(256);
        let cluster = Arc::new(Self {
            name: name.to_string(),
            state: Mutex::new(State {
                rv: 0,
                types: resources::builtins(),
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                compacted_rv: 0,
                pending: BTreeSet::new(),
            }),
            events,
            faults: Mutex::new(Faults::default()),
            wake: Notify::new(),
            drop_watches: tokio::sync::watch::channel(0).0,
            settings,
        });
        let opts = WriteOptions {
            manager: "kube-apiserver".into(),
            ..Default::default()
        };
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
            let rt = cluster
                .resolve("", "v1", "namespaces")
                .unwrap_or_else(|| resources::builtins().remove(0));
            // Creating a built-in namespace in an empty cluster cannot fail.
            let _ = cluster.create(&rt, None, body, &opts);
        }
        // A few Ready nodes across zones, so `get nodes` and topology spread make sense. Nothing
        // runs on them: kubesim simulates workload status, not containers.
        if let Some(rt) = cluster.resolve("", "v1", "nodes") {
            cluster.seed_nodes(&rt);
        }
        cluster
    }

    /// Registers the simulated nodes with their status in one write each (as a kubelet's first
    /// report), keeping an idle cluster's memory small.
    fn seed_nodes(&self, rt: &ResourceType) {
        let mut state = self.lock();
        for i in 1..=NODES {
            let full = node(i);
            let status = full["status"].clone();
            // A node of our own making in an empty cluster always prepares.
            if let Ok(mut obj) = self.prepare_new(&mut state, rt, full) {
                obj["status"] = status;
                state.rv += 1;
                obj["metadata"]["resourceVersion"] = json!(state.rv.to_string());
                let key = Self::key(rt, None, &format!("kubesim-node-{i}"));
                state.objects.insert(key, obj);
            }
        }
        // Part of the cluster's starting state, not of its watch history: no watch can be older.
        state.compacted_rv = state.rv;
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every mutation completes before the guard drops, so a poisoned lock still guards sound state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn faults(&self) -> Faults {
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_faults(&self, faults: Faults) {
        *self.faults.lock().unwrap_or_else(|p| p.into_inner()) = faults;
    }

    /// Ends every open watch of this cluster.
    pub fn drop_all_watches(&self) {
        self.drop_watches.send_modify(|n| *n += 1);
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Every served resource type.
    pub fn types(&self) -> Vec<ResourceType> {
        self.lock().types.clone()
    }

    /// The resource type served at group/version/plural.
    pub fn resolve(&self, group: &str, version: &str, plural: &str) -> Option<ResourceType> {
        self.lock()
            .types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
            .cloned()
    }

    /// Number of stored objects (for benchmarks).
    pub fn object_count(&self) -> usize {
        self.lock().objects.len()
    }

    fn key(rt: &ResourceType, ns: Option<&str>, name: &str) -> ObjKey {
        let (group, plural) = rt.storage_key();
        let ns = if rt.namespaced { ns.unwrap_or("") } else { "" };
        (group, plural, ns.to_string(), name.to_string())
    }

    /// The object as the requested version shows it.
    fn present(rt: &ResourceType, obj: &Value) -> Value {
        let mut v = obj.clone();
        v["apiVersion"] = json!(rt.api_version());
        v["kind"] = json!(rt.kind);
        v
    }

    /// Records a change: next resourceVersion, history, watchers, controllers.
    fn commit(
        &self,
        state: &mut State,
        key: ObjKey,
        object: Option<Value>,
        kind: &'static str,
        deleted: Option<Value>,
    ) -> Value {
        state.rv += 1;
        let rv = state.rv;
        tracing::debug!(cluster = %self.name, rv, kind, group = %key.0, resource = %key.1, namespace = %key.2, name = %key.3, "commit");
        let mut prev = None;
        let mut shown = match object {
            Some(mut obj) => {
                obj["metadata"]["resourceVersion"] = json!(rv.to_string());
                prev = state.objects.insert(key.clone(), obj.clone());
                obj
            }
            None => {
                state.objects.remove(&key);
                deleted.unwrap_or(Value::Null)
            }
        };
        if kind == "DELETED" {
            shown["metadata"]["resourceVersion"] = json!(rv.to_string());
        }
        let event = Arc::new(WatchEvent {
            rv,
            group: key.0.clone(),
            plural: key.1.clone(),
            namespace: key.2.clone(),
            kind,
            object: shown.clone(),
            prev: if kind == "MODIFIED" { prev } else { None },
        });
        state.history.push_back(Arc::clone(&event));
        while state.history.len() > self.settings.history {
            if let Some(old) = state.history.pop_front() {
                state.compacted_rv = old.rv;
            }
        }
        let _ = self.events.send(event);
        if key.1 == "customresourcedefinitions" {
            refresh_types(state);
        }
        shown
    }

    /// Queues simulated-controller work for an object a client just wrote: a first pass now
    /// (progressing) and one when the ready delay has passed.
    fn schedule(&self, state: &mut State, key: &ObjKey) {
        if controllers::watches(&key.1) {
            let now = Instant::now();
            let delay = state
                .objects
                .get(key)
                .and_then(controllers::ready_after)
                .unwrap_or(self.settings.ready_delay);
            state.pending.insert((now, key.clone()));
            state.pending.insert((now + delay, key.clone()));
            self.wake.notify_one();
        }
    }

    /// GET one object.
    pub fn get(&self, rt: &ResourceType, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        let state = self.lock();
        let obj = state
            .objects
            .get(&Self::key(rt, ns, name))
            .ok_or_else(|| ApiError::not_found(&rt.group_resource(), name))?;
        Ok(Self::present(rt, obj))
    }

    /// LIST: objects of a type (in a namespace or all), filtered, paginated. Returns (items, rv, continue).
    pub fn list(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        filter: impl Fn(&Value) -> bool,
        limit: Option<usize>,
        continue_after: Option<&str>,
    ) -> (Vec<Value>, u64, Option<String>) {
        let state = self.lock();
        let (group, plural) = rt.storage_key();
        let mut items = Vec::new();
        let mut next = None;
        for ((g, p, n, name), obj) in state
            .objects
            .range((group.clone(), plural.clone(), String::new(), String::new())..)
        {
            if *g != group || *p != plural {
                break;
            }
            if let Some(ns) = ns
                && rt.namespaced
                && n != ns
            {
                continue;
            }
            let position = format!("{n}/{name}");
            if continue_after.is_some_and(|after| position.as_str() <= after) {
                continue;
            }
            if !filter(obj) {
                continue;
            }
            if limit.is_some_and(|l| items.len() >= l) {
                next = items
                    .last()
                    .map(|_: &Value| ())
                    .and(Some(last_position(&items)));
                break;
            }
            items.push(Self::present(rt, obj));
        }
        (items, state.rv, next)
    }

    /// Starts a watch of a type: the events to send first and the live channel, without a gap.
    pub fn watch(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        rv: Option<u64>,
    ) -> Result<WatchStart, ApiError> {
        let state = self.lock();
        let rx = self.events.subscribe();
        let (group, plural) = rt.storage_key();
        let in_scope = |n: &str| ns.is_none_or(|ns| !rt.namespaced || n == ns);
        let initial = match rv {
            None | Some(0) => state
                .objects
                .iter()
                .filter(|((g, p, n, _), _)| *g == group && *p == plural && in_scope(n))
                .map(|((g, p, n, _), obj)| {
                    Arc::new(WatchEvent {
                        rv: obj["metadata"]["resourceVersion"]
                            .as_str()
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(0),
                        group: g.clone(),
                        plural: p.clone(),
                        namespace: n.clone(),
                        kind: "ADDED",
                        object: obj.clone(),
                        prev: None,
                    })
                })
                .collect(),
            Some(from) => {
                if from < state.compacted_rv {
                    return Err(ApiError::gone(format!(
                        "too old resource version: {from} ({})",
                        state.compacted_rv + 1
                    )));
                }
                state
                    .history
                    .iter()
                    .filter(|e| {
                        e.rv > from
                            && e.group == group
                            && e.plural == plural
                            && in_scope(&e.namespace)
                    })
                    .cloned()
                    .collect()
            }
        };
        Ok(WatchStart {
            initial,
            rx,
            rv: state.rv,
        })
    }

    /// CREATE.
    pub fn create(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        mut body: Value,
        opts: &WriteOptions,
    ) -> Result<Value, ApiError> {
        check_type(rt, &body)?;
        let ns = self.namespace_for(rt, ns, &mut body)?;
        let name = match meta::name_of(&body) {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => match body["metadata"]["generateName"].as_str() {
                Some(prefix) => format!("{prefix}{}", meta::name_suffix()),
                None => {
                    return Err(ApiError::invalid(
                        &rt.kind,
                        "",
                        vec![(
                            "metadata.name".into(),
                            "Required value: name or generateName is required".into(),
                        )],
                    ));
                }
            },
        };
        body["metadata"]["name"] = json!(name);
        meta::validate_name(&rt.kind, &name)?;
        let mut state = self.lock();
        self.check_namespace(&state, rt, &ns)?;
        let key = Self::key(rt, Some(&ns), &name);
        if state.objects.contains_key(&key) {
            return Err(ApiError::already_exists(&rt.group_resource(), &name));
        }
        let mut obj = self.prepare_new(&mut state, rt, body)?;
        let (time, api_version) = (meta::now(), rt.api_version());
        let writer = Writer {
            manager: &opts.manager,
            api_version: &api_version,
            time: &time,
            subresource: "",
        };
        ssa::record_update(None, &mut obj, &writer, rt.status);
        if opts.dry_run {
            return Ok(Self::present(rt, &obj));
        }
        let shown = self.commit(&mut state, key.clone(), Some(obj), "ADDED", None);
        self.schedule(&mut state, &key);
        Ok(Self::present(rt, &shown))
    }

    fn namespace_for(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        body: &mut Value,
    ) -> Result<String, ApiError> {
        if !rt.namespaced {
            if let Some(m) = body["metadata"].as_object_mut() {
                m.remove("namespace");
            }
            return Ok(String::new());
        }
        let from_body = body["metadata"]["namespace"].as_str().map(str::to_string);
        let ns = match (ns, from_body) {
            (Some(path), Some(b)) if path != b => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            (Some(path), _) => path.to_string(),
            (None, Some(b)) => b,
            (None, None) => {
                return Err(ApiError::bad_request(
                    "a namespace is required for a namespaced resource",
                ));
            }
        };
        body["metadata"]["namespace"] = json!(ns);
        Ok(ns)
    }

    fn check_namespace(&self, state: &State, rt: &ResourceType, ns: &str) -> Result<(), ApiError> {
        if !rt.namespaced {
            return Ok(());
        }
        let key = (
            String::new(),
            "namespaces".to_string(),
            String::new(),
            ns.to_string(),
        );
        match state.objects.get(&key) {
            None => Err(ApiError::not_found("namespaces", ns)),
            Some(n) if !n["metadata"]["deletionTimestamp"].is_null() => {
                Err(ApiError::conflict_namespace_terminating(ns))
            }
            Some(_) => Ok(()),
        }
    }

    /// Server-set fields of a new object: uid, timestamps, generation, defaults, cleared status.
    fn prepare_new(
        &self,
        state: &mut State,
        rt: &ResourceType,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
        obj["apiVersion"] = json!(rt.api_version());
        obj["kind"] = json!(rt.kind);
        let m = obj["metadata"]
            .as_object_mut()
            .ok_or_else(|| ApiError::bad_request("metadata must be an object"))?;
        for f in [
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
        ] {
            m.remove(f);
        }
        m.insert("uid".into(), json!(meta::uid()));
        m.insert("creationTimestamp".into(), json!(meta::now()));
        if rt.generation {
            m.insert("generation".into(), json!(1));
        }
        if rt.status
            && let Some(o) = obj.as_object_mut()
        {
            o.remove("status");
        }
        if resources::is_builtin(&rt.group, &rt.plural) {
            meta::drop_nulls(&mut obj);
        }
        controllers::default_object(&rt.kind, &mut obj, state.rv);
        controllers::validate(&rt.kind, None, &obj)?;
        Ok(obj)
    }

    /// UPDATE (PUT), of the object or its status.
    pub fn update(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        mut body: Value,
        opts: &WriteOptions,
    ) -> Result<Value, ApiError> {
        check_type(rt, &body)?;
        if meta::name_of(&body).is_some_and(|n| n != name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                meta::name_of(&body).unwrap_or_default()
            )));
        }
        body["metadata"]["name"] = json!(name);
        let ns = self.namespace_for(rt, ns, &mut body)?;
        let mut state = self.lock();
        let key = Self::key(rt, Some(&ns), name);
        let old = state
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&rt.group_resource(), name))?;
        if let Some(rv) = body["metadata"]["resourceVersion"].as_str()
            && Some(rv) != old["metadata"]["resourceVersion"].as_str()
        {
            return Err(ApiError::conflict(
                &rt.group_resource(),
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        let new = merge_write(rt, &old, body, opts.subresource.as_deref());
        self.finish_write(&mut state, rt, key, old, new, opts)
    }

    /// PATCH, including server-side apply (which creates a missing object).
    pub fn patch(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        kind: PatchType,
        body: Value,
        opts: &WriteOptions,
    ) -> Result<(Value, bool), ApiError> {
        let ns_owned = if rt.namespaced {
            ns.unwrap_or("").to_string()
        } else {
            String::new()
        };
        let mut state = self.lock();
        let key = Self::key(rt, Some(&ns_owned), name);
        let old = state.objects.get(&key).cloned();
        let status_only = opts.subresource.as_deref() == Some("status");
        match (kind, old) {
            (PatchType::Apply { force }, old) => {
                check_type(rt, &body)?;
                if meta::name_of(&body).is_some_and(|n| n != name) {
                    return Err(ApiError::bad_request(format!(
                        "the name of the object ({}) does not match the name on the URL ({name})",
                        meta::name_of(&body).unwrap_or_default()
                    )));
                }
                if rt.namespaced
                    && body["metadata"]["namespace"]
                        .as_str()
                        .is_some_and(|n| n != ns_owned)
                {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                let mut config = body;
                config["apiVersion"] = json!(rt.api_version());
                config["kind"] = json!(rt.kind);
                config["metadata"]["name"] = json!(name);
                if rt.namespaced {
                    config["metadata"]["namespace"] = json!(ns_owned);
                }
                let time = meta::now();
                let writer = Writer {
                    manager: &opts.manager,
                    api_version: &rt.api_version(),
                    time: &time,
                    subresource: opts.subresource.as_deref().unwrap_or(""),
                };
                let skip_status = rt.status && !status_only;
                let applied = ssa::apply(old.as_ref(), &config, &writer, force, skip_status)
                    .map_err(|conflicts| {
                        let (message, causes) = ssa::conflict_message(&conflicts);
                        ApiError::apply_conflict(message, causes)
                    })?;
                match old {
                    None => {
                        if status_only {
                            return Err(ApiError::not_found(&rt.group_resource(), name));
                        }
                        meta::validate_name(&rt.kind, name)?;
                        self.check_namespace(&state, rt, &ns_owned)?;
                        let managed = applied["metadata"]["managedFields"].clone();
                        let mut obj = self.prepare_new(&mut state, rt, applied)?;
                        obj["metadata"]["managedFields"] = managed;
                        if opts.dry_run {
                            return Ok((Self::present(rt, &obj), true));
                        }
                        let shown = self.commit(&mut state, key.clone(), Some(obj), "ADDED", None);
                        self.schedule(&mut state, &key);
                        Ok((Self::present(rt, &shown), true))
                    }
                    Some(old) => {
                        let mut new = applied;
                        if skip_status {
                            restore(&mut new, &old, "status");
                        }
                        let opts = WriteOptions {
                            manager: String::new(),
                            ..opts.clone()
                        };
                        Ok((
                            self.finish_write(&mut state, rt, key, old, new, &opts)?,
                            false,
                        ))
                    }
                }
            }
            (_, None) => Err(ApiError::not_found(&rt.group_resource(), name)),
            (PatchType::Json, Some(old)) => {
                let mut patched = old.clone();
                patch::json_patch(&mut patched, &body)?;
                self.finish_patch(&mut state, rt, key, name, old, patched, opts)
            }
            (PatchType::Merge, Some(old)) => {
                let mut patched = old.clone();
                patch::merge_patch(&mut patched, &body);
                self.finish_patch(&mut state, rt, key, name, old, patched, opts)
            }
            (PatchType::Strategic, Some(old)) => {
                if !resources::is_builtin(&rt.group, &rt.plural) {
                    return Err(ApiError::unsupported_media_type(
                        "application/strategic-merge-patch+json",
                        &crate::wire::CUSTOM_PATCH_TYPES,
                    ));
                }
                let mut patched = old.clone();
                patch::strategic_merge(&mut patched, &body)?;
                self.finish_patch(&mut state, rt, key, name, old, patched, opts)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_patch(
        &self,
        state: &mut State,
        rt: &ResourceType,
        key: ObjKey,
        name: &str,
        old: Value,
        patched: Value,
        opts: &WriteOptions,
    ) -> Result<(Value, bool), ApiError> {
        {
            {
                if patched["metadata"]["resourceVersion"] != old["metadata"]["resourceVersion"]
                    && !patched["metadata"]["resourceVersion"].is_null()
                {
                    return Err(ApiError::conflict(
                        &rt.group_resource(),
                        name,
                        "the object has been modified; please apply your changes to the latest version and try again",
                    ));
                }
                if meta::name_of(&patched) != Some(name) {
                    return Err(ApiError::bad_request(
                        "metadata.name cannot be changed by a patch",
                    ));
                }
                let new = merge_write(rt, &old, patched, opts.subresource.as_deref());
                Ok((self.finish_write(state, rt, key, old, new, opts)?, false))
            }
        }
    }

    /// The common tail of update and patch: immutability, defaults, generation, ownership, commit.
    fn finish_write(
        &self,
        state: &mut State,
        rt: &ResourceType,
        key: ObjKey,
        old: Value,
        mut new: Value,
        opts: &WriteOptions,
    ) -> Result<Value, ApiError> {
        for f in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "namespace",
            "name",
        ] {
            restore(&mut new["metadata"], &old["metadata"], f);
        }
        new["apiVersion"] = json!(rt.api_version());
        new["kind"] = json!(rt.kind);
        if resources::is_builtin(&rt.group, &rt.plural) {
            meta::drop_nulls(&mut new);
        }
        controllers::default_object(&rt.kind, &mut new, state.rv);
        controllers::validate(&rt.kind, Some(&old), &new)?;
        if rt.generation && spec_part(&old) != spec_part(&new) {
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
            new["metadata"]["generation"] = json!(generation);
        }
        if !opts.manager.is_empty() {
            let (time, api_version) = (meta::now(), rt.api_version());
            let writer = Writer {
                manager: &opts.manager,
                api_version: &api_version,
                time: &time,
                subresource: opts.subresource.as_deref().unwrap_or(""),
            };
            ssa::record_update(
                Some(&old),
                &mut new,
                &writer,
                rt.status && opts.subresource.as_deref() != Some("status"),
            );
        }
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        let deleting = !new["metadata"]["deletionTimestamp"].is_null();
        let finalizers_empty = new["metadata"]["finalizers"]
            .as_array()
            .is_none_or(Vec::is_empty);
        if opts.dry_run {
            return Ok(Self::present(rt, &new));
        }
        if deleting && finalizers_empty {
            let shown = self.commit(state, key.clone(), None, "DELETED", Some(new));
            self.after_delete(state, &key, &shown);
            return Ok(Self::present(rt, &shown));
        }
        if without_times(&new) == without_times(&old) {
            return Ok(Self::present(rt, &old));
        }
        let spec_changed = spec_part(&old) != spec_part(&new);
        let shown = self.commit(state, key.clone(), Some(new), "MODIFIED", None);
        if spec_changed {
            self.schedule(state, &key);
        }
        Ok(Self::present(rt, &shown))
    }

    /// DELETE one object. Returns the object when deletion waits on finalizers, else a Status.
    pub fn delete(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        options: &Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let mut state = self.lock();
        let key = Self::key(rt, ns, name);
        let old = state
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&rt.group_resource(), name))?;
        let pre = &options["preconditions"];
        if pre["uid"]
            .as_str()
            .is_some_and(|u| Some(u) != old["metadata"]["uid"].as_str())
        {
            return Err(ApiError::conflict(
                &rt.group_resource(),
                name,
                format!(
                    "Precondition failed: UID in precondition: {}, UID in object meta: {}",
                    pre["uid"].as_str().unwrap_or(""),
                    old["metadata"]["uid"].as_str().unwrap_or("")
                ),
            ));
        }
        if pre["resourceVersion"]
            .as_str()
            .is_some_and(|r| Some(r) != old["metadata"]["resourceVersion"].as_str())
        {
            return Err(ApiError::conflict(
                &rt.group_resource(),
                name,
                "Precondition failed: resourceVersion does not match",
            ));
        }
        if dry_run {
            return Ok(Self::present(rt, &old));
        }
        let policy = options["propagationPolicy"]
            .as_str()
            .unwrap_or("Background");
        let result = self.delete_locked(&mut state, key, old, policy);
        Ok(match result {
            Some(pending) => Self::present(rt, &pending),
            None => {
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                           "details": {"name": name, "group": rt.group, "kind": rt.plural}})
            }
        })
    }

    /// Deletes (or marks for deletion) under the lock. Returns the object if it still exists.
    fn delete_locked(
        &self,
        state: &mut State,
        key: ObjKey,
        obj: Value,
        policy: &str,
    ) -> Option<Value> {
        let mut obj = obj;
        let has_finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        let is_namespace = key.1 == "namespaces" && key.0.is_empty();
        if is_namespace {
            if obj["metadata"]["deletionTimestamp"].is_null() {
                obj["metadata"]["deletionTimestamp"] = json!(meta::now());
                obj["status"]["phase"] = json!("Terminating");
                self.commit(state, key.clone(), Some(obj), "MODIFIED", None);
            }
            let contents: Vec<(ObjKey, Value)> = state
                .objects
                .iter()
                .filter(|(k, _)| k.2 == key.3 && !k.2.is_empty())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            for (k, v) in contents {
                self.delete_locked(state, k, v, "Background");
            }
            return self.finish_namespace(state, &key.3);
        }
        if has_finalizers || policy == "Foreground" {
            if obj["metadata"]["deletionTimestamp"].is_null() {
                obj["metadata"]["deletionTimestamp"] = json!(meta::now());
                obj["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            }
            if !has_finalizers {
                // Foreground with no finalizers: dependents go first, then the owner, at once here.
                self.delete_dependents(state, &obj, "Background");
                let shown = self.commit(state, key.clone(), None, "DELETED", Some(obj));
                self.after_delete(state, &key, &shown);
                return None;
            }
            return Some(self.commit(state, key, Some(obj), "MODIFIED", None));
        }
        let shown = self.commit(state, key.clone(), None, "DELETED", Some(obj.clone()));
        if policy == "Orphan" {
            self.orphan_dependents(state, &obj);
        } else {
            self.delete_dependents(state, &obj, policy);
        }
        self.after_delete(state, &key, &shown);
        None
    }

    fn after_delete(&self, state: &mut State, key: &ObjKey, deleted: &Value) {
        if key.1 == "customresourcedefinitions" && key.0 == "apiextensions.k8s.io" {
            let group = deleted["spec"]["group"].as_str().unwrap_or("").to_string();
            let plural = deleted["spec"]["names"]["plural"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let doomed: Vec<(ObjKey, Value)> = state
                .objects
                .iter()
                .filter(|(k, _)| k.0 == group && k.1 == plural)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            for (k, v) in doomed {
                self.commit(state, k, None, "DELETED", Some(v));
            }
            refresh_types(state);
        }
        if !key.2.is_empty() {
            self.finish_namespace(state, &key.2);
        }
    }

    /// Removes a terminating namespace once it is empty; returns it if it still exists.
    fn finish_namespace(&self, state: &mut State, ns: &str) -> Option<Value> {
        let ns_key = (
            String::new(),
            "namespaces".to_string(),
            String::new(),
            ns.to_string(),
        );
        let obj = state.objects.get(&ns_key)?.clone();
        if obj["metadata"]["deletionTimestamp"].is_null() {
            return Some(obj);
        }
        if state.objects.keys().any(|k| k.2 == ns) {
            return Some(obj);
        }
        self.commit(state, ns_key, None, "DELETED", Some(obj));
        None
    }

    fn dependents(state: &State, owner: &Value) -> Vec<(ObjKey, Value)> {
        let Some(uid) = owner["metadata"]["uid"].as_str() else {
            return Vec::new();
        };
        state
            .objects
            .iter()
            .filter(|(_, v)| {
                v["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"].as_str() == Some(uid)))
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn delete_dependents(&self, state: &mut State, owner: &Value, policy: &str) {
        for (k, v) in Self::dependents(state, owner) {
            if state.objects.contains_key(&k) {
                self.delete_locked(state, k, v, policy);
            }
        }
    }

    fn orphan_dependents(&self, state: &mut State, owner: &Value) {
        let uid = owner["metadata"]["uid"].clone();
        for (k, mut v) in Self::dependents(state, owner) {
            if let Some(refs) = v["metadata"]["ownerReferences"].as_array_mut() {
                refs.retain(|r| r["uid"] != uid);
            }
            self.commit(state, k, Some(v), "MODIFIED", None);
        }
    }

    /// DELETE a collection: every object of the type (in the namespace) the filter keeps.
    pub fn delete_collection(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        filter: impl Fn(&Value) -> bool,
        options: &Value,
    ) -> Vec<Value> {
        let (items, _, _) = self.list(rt, ns, filter, None, None);
        let mut deleted = Vec::new();
        for item in items {
            let name = meta::name_of(&item).unwrap_or_default().to_string();
            let item_ns = item["metadata"]["namespace"].as_str().map(str::to_string);
            if self
                .delete(rt, item_ns.as_deref(), &name, options, false)
                .is_ok()
            {
                deleted.push(item);
            }
        }
        deleted
    }

    /// Runs due simulated-controller work; returns when the next item is due.
    pub(crate) fn run_controllers(&self, now: Instant) -> Option<Instant> {
        let mut state = self.lock();
        loop {
            let first = state.pending.first().cloned()?;
            if first.0 > now {
                return Some(first.0);
            }
            state.pending.remove(&first);
            let key = first.1;
            let Some(obj) = state.objects.get(&key).cloned() else {
                continue;
            };
            let due_ready = self.is_ready_time(&state, &key, now);
            let outcome = controllers::reconcile(&key.1, &obj, due_ready);
            let mut new = obj.clone();
            if let Some(status) = outcome.status {
                new["status"] = status;
            }
            if let Some(spec_patch) = &outcome.spec_patch {
                patch::merge_patch(&mut new, spec_patch);
            }
            if key.1 == "deployments" && key.0 == "apps" {
                let revision = self.sync_replica_sets(&mut state, &key, &obj);
                new["metadata"]["annotations"][REVISION_ANNOTATION] = json!(revision.to_string());
            }
            if new != obj {
                let time = meta::now();
                let api_version = new["apiVersion"].as_str().unwrap_or("").to_string();
                let writer = Writer {
                    manager: "kube-controller-manager",
                    api_version: &api_version,
                    time: &time,
                    subresource: "status",
                };
                ssa::record_update(Some(&obj), &mut new, &writer, false);
                self.commit(&mut state, key.clone(), Some(new), "MODIFIED", None);
            }
            for child in outcome.create {
                let rt = state
                    .types
                    .iter()
                    .find(|t| t.kind == child["kind"].as_str().unwrap_or(""))
                    .cloned();
                if let Some(rt) = rt {
                    let name = meta::name_of(&child).unwrap_or_default().to_string();
                    let ckey = Self::key(&rt, child["metadata"]["namespace"].as_str(), &name);
                    if !state.objects.contains_key(&ckey)
                        && let Ok(mut obj) = self.prepare_new(&mut state, &rt, child)
                    {
                        let time = meta::now();
                        let writer = Writer {
                            manager: "kube-controller-manager",
                            api_version: &rt.api_version(),
                            time: &time,
                            subresource: "",
                        };
                        ssa::record_update(None, &mut obj, &writer, rt.status);
                        self.commit(&mut state, ckey.clone(), Some(obj), "ADDED", None);
                        self.schedule(&mut state, &ckey);
                    }
                }
            }
        }
    }

    /// The Deployment controller's ReplicaSets: one per distinct pod template, named by the
    /// template's hash, owned by the Deployment and numbered by `deployment.kubernetes.io/revision`
    /// (a template seen before — `kubectl rollout undo` — becomes the newest revision again); the
    /// current one runs the replicas, older ones are scaled to zero. Returns the current revision.
    fn sync_replica_sets(&self, state: &mut State, key: &ObjKey, deploy: &Value) -> u64 {
        let Some(rt) = state
            .types
            .iter()
            .find(|t| t.group == "apps" && t.plural == "replicasets")
            .cloned()
        else {
            return 0;
        };
        let ns = key.2.clone();
        let uid = deploy["metadata"]["uid"].clone();
        let mut template = deploy["spec"]["template"].clone();
        let hash = template_hash(&template);
        template["metadata"]["labels"]["pod-template-hash"] = json!(hash);
        let owned: Vec<(ObjKey, Value)> = state
            .objects
            .iter()
            .filter(|((g, p, n, _), o)| {
                g == "apps"
                    && p == "replicasets"
                    && *n == ns
                    && o["metadata"]["ownerReferences"]
                        .as_array()
                        .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
            })
            .map(|(k, o)| (k.clone(), o.clone()))
            .collect();
        let revision_of = |o: &Value| -> u64 {
            o["metadata"]["annotations"][REVISION_ANNOTATION]
                .as_str()
                .and_then(|r| r.parse().ok())
                .unwrap_or(0)
        };
        let newest = owned.iter().map(|(_, o)| revision_of(o)).max().unwrap_or(0);
        let replicas = deploy["spec"]["replicas"].as_i64().unwrap_or(1);
        let name = format!("{}-{hash}", key.3);
        let current = owned.iter().find(|(k, _)| k.3 == name);
        let revision = match current {
            Some((_, o)) if revision_of(o) == newest => newest,
            _ => newest + 1,
        };
        let time = meta::now();
        let writer = Writer {
            manager: "kube-controller-manager",
            api_version: "apps/v1",
            time: &time,
            subresource: "",
        };
        for (k, o) in &owned {
            let mut updated = o.clone();
            if k.3 == name {
                updated["spec"]["replicas"] = json!(replicas);
                updated["spec"]["template"] = template.clone();
                updated["metadata"]["annotations"][REVISION_ANNOTATION] =
                    json!(revision.to_string());
            } else {
                updated["spec"]["replicas"] = json!(0);
            }
            if updated != *o {
                ssa::record_update(Some(o), &mut updated, &writer, true);
                self.commit(state, k.clone(), Some(updated), "MODIFIED", None);
                self.schedule(state, k);
            }
        }
        if current.is_none() {
            let mut selector = deploy["spec"]["selector"].clone();
            selector["matchLabels"]["pod-template-hash"] = json!(hash);
            let mut labels = template["metadata"]["labels"].clone();
            labels["pod-template-hash"] = json!(hash);
            let rs = json!({
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "metadata": {
                    "name": name,
                    "namespace": ns,
                    "labels": labels,
                    "annotations": {REVISION_ANNOTATION: revision.to_string()},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                        "name": key.3, "uid": uid, "controller": true, "blockOwnerDeletion": true}],
                },
                "spec": {"replicas": replicas, "selector": selector, "template": template},
            });
            if let Ok(mut obj) = self.prepare_new(state, &rt, rs) {
                ssa::record_update(None, &mut obj, &writer, true);
                let ckey = Self::key(&rt, Some(&ns), &name);
                self.commit(state, ckey.clone(), Some(obj), "ADDED", None);
                self.schedule(state, &ckey);
            }
        }
        revision
    }

    /// Whether `key`'s ready delay has passed since its last spec change.
    fn is_ready_time(&self, state: &State, key: &ObjKey, now: Instant) -> bool {
        // A later scheduled item for the same key means a newer change is still settling.
        !state.pending.iter().any(|(t, k)| k == key && *t > now)
    }
}

fn last_position(items: &[Value]) -> String {
    items
        .last()
        .map(|o| {
            format!(
                "{}/{}",
                o["metadata"]["namespace"].as_str().unwrap_or(""),
                o["metadata"]["name"].as_str().unwrap_or("")
            )
        })
        .unwrap_or_default()
}

fn refresh_types(state: &mut State) {
    let mut types = resources::builtins();
    for ((g, p, _, _), crd) in &state.objects {
        if g == "apiextensions.k8s.io"
            && p == "customresourcedefinitions"
            && crd["metadata"]["deletionTimestamp"].is_null()
        {
            types.extend(resources::from_crd(crd));
        }
    }
    state.types = types;
}

fn check_type(rt: &ResourceType, body: &Value) -> Result<(), ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "the body must be a JSON or YAML object",
        ));
    }
    if let Some(kind) = body["kind"].as_str()
        && kind != rt.kind
    {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({kind}) does not match the expected kind ({})",
            rt.kind
        )));
    }
    if let Some(av) = body["apiVersion"].as_str()
        && av != rt.api_version()
    {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({av}) does not match the expected API version ({})",
            rt.api_version()
        )));
    }
    if !body["metadata"].is_object() && !body["metadata"].is_null() {
        return Err(ApiError::bad_request("metadata must be an object"));
    }
    Ok(())
}

/// What a write may change: the main resource keeps the old status (when status is a subresource),
/// the status subresource changes only status.
fn merge_write(rt: &ResourceType, old: &Value, body: Value, subresource: Option<&str>) -> Value {
    if subresource == Some("status") {
        let mut new = old.clone();
        new["status"] = body["status"].clone();
        return new;
    }
    let mut new = body;
    if rt.status {
        restore(&mut new, old, "status");
    }
    if new["metadata"]["managedFields"].is_null() {
        new["metadata"]["managedFields"] = old["metadata"]["managedFields"].clone();
    }
    new
}

fn restore(new: &mut Value, old: &Value, field: &str) {
    let Some(map) = new.as_object_mut() else {
        return;
    };
    match old.get(field) {
        Some(v) => {
            map.insert(field.to_string(), v.clone());
        }
        None => {
            map.remove(field);
        }
    }
}

fn without_times(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(list) = v["metadata"]["managedFields"].as_array_mut() {
        for e in list {
            if let Some(m) = e.as_object_mut() {
                m.remove("time");
            }
        }
    }
    v
}
