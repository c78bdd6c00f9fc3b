//! The apply plan, as a pure function of data: in which order objects are applied, which objects
//! are pruned (and in which order), and which objects are ours to touch at all.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The label every object applied for an app carries.
pub const APP_LABEL: &str = "app.flotilla.dev/name";
/// The label on a namespace the agent created for an app (`createNamespace`); such namespaces are
/// not part of any app's inventory and are never pruned.
pub const CREATED_BY_LABEL: &str = "app.flotilla.dev/created-by";
/// Annotation that overrides the default ordering: lower waves first.
pub const WAVE_ANNOTATION: &str = "flotilla.dev/sync-wave";
/// Argo CD's annotation of the same meaning (used when ours is absent), so Argo CD repositories
/// deploy unchanged.
pub const ARGO_WAVE_ANNOTATION: &str = "argocd.argoproj.io/sync-wave";

/// Identity of an object in a cluster.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjRef {
    /// `v1`, `apps/v1`.
    pub api_version: String,
    pub kind: String,
    /// Empty for cluster-scoped objects.
    pub namespace: String,
    pub name: String,
}

impl ObjRef {
    pub fn of(obj: &Value) -> Self {
        Self {
            api_version: obj["apiVersion"].as_str().unwrap_or("").to_string(),
            kind: obj["kind"].as_str().unwrap_or("").to_string(),
            namespace: obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            name: obj["metadata"]["name"].as_str().unwrap_or("").to_string(),
        }
    }

    pub fn group(&self) -> &str {
        self.api_version.rsplit_once('/').map_or("", |(g, _)| g)
    }

    /// Same object regardless of API version (apps/v1 vs apps/v1beta2 name the same thing).
    pub fn same_object(&self, other: &ObjRef) -> bool {
        self.group() == other.group()
            && self.kind == other.kind
            && self.namespace == other.namespace
            && self.name == other.name
    }
}

impl std::fmt::Display for ObjRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// Argo CD's resource hook annotations, and Helm's, and what they make an object: the bundle's
/// vocabulary, shared with the hub, whose bundles leave out what is never applied.
pub use flotilla_bundle::hooks::{HELM_HOOK_ANNOTATION, HOOK_ANNOTATION, Role, role};
pub const HOOK_DELETE_ANNOTATION: &str = "argocd.argoproj.io/hook-delete-policy";
pub const HELM_HOOK_DELETE_ANNOTATION: &str = "helm.sh/hook-delete-policy";

/// When a hook runs in a sync: the wire's vocabulary, reported as is.
pub use flotilla_proto::v1::HookPhase;

/// What to delete a hook object on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeletePolicy {
    /// The previous run's object, before this run creates its own (the default).
    BeforeHookCreation,
    HookSucceeded,
    HookFailed,
}

/// A hook's delete policies (Argo CD's annotation, else Helm's; default BeforeHookCreation).
pub fn delete_policies(obj: &Value) -> Vec<DeletePolicy> {
    let annotations = &obj["metadata"]["annotations"];
    let raw = annotations[HOOK_DELETE_ANNOTATION]
        .as_str()
        .or_else(|| annotations[HELM_HOOK_DELETE_ANNOTATION].as_str())
        .unwrap_or("");
    let mut out: Vec<DeletePolicy> = raw
        .split(',')
        .filter_map(|p| match p.trim() {
            "BeforeHookCreation" | "before-hook-creation" => Some(DeletePolicy::BeforeHookCreation),
            "HookSucceeded" | "hook-succeeded" => Some(DeletePolicy::HookSucceeded),
            "HookFailed" | "hook-failed" => Some(DeletePolicy::HookFailed),
            _ => None,
        })
        .collect();
    if out.is_empty() {
        out.push(DeletePolicy::BeforeHookCreation);
    }
    out
}

/// Whether `left`, a hook object an earlier run left in the cluster, is an earlier run of `hook`
/// (as prepared: namespace filled in): the same name, or for a `generateName` hook any object of
/// the same kind created from its prefix.
pub fn earlier_run_of(hook: &Value, left: &ObjRef) -> bool {
    let r = ObjRef::of(hook);
    if r.group() != left.group() || r.kind != left.kind || r.namespace != left.namespace {
        return false;
    }
    if !r.name.is_empty() {
        return r.name == left.name;
    }
    hook["metadata"]["generateName"]
        .as_str()
        .is_some_and(|prefix| !prefix.is_empty() && left.name.starts_with(prefix))
}

/// Hook objects left by earlier runs that no hook of the bundle accounts for any more (the hook
/// left git, or the app is being removed): pruned like the app's resources. Hooks are the app's.
pub fn stale_hooks(left: &[ObjRef], hooks: &[Value]) -> Vec<ObjRef> {
    left.iter()
        .filter(|l| !hooks.iter().any(|h| earlier_run_of(h, l)))
        .cloned()
        .collect()
}

/// The default rank of a kind: CRDs, Namespaces, cluster-scoped and config kinds, workloads and
/// Services, then everything else (custom resources among them).
pub fn kind_rank(group: &str, kind: &str) -> i32 {
    match (group, kind) {
        ("apiextensions.k8s.io", "CustomResourceDefinition") => 0,
        ("", "Namespace") => 1,
        (
            "",
            "ServiceAccount"
            | "ConfigMap"
            | "Secret"
            | "PersistentVolumeClaim"
            | "PersistentVolume"
            | "LimitRange"
            | "ResourceQuota",
        )
        | ("rbac.authorization.k8s.io", _)
        | ("storage.k8s.io", _)
        | ("scheduling.k8s.io", "PriorityClass")
        | ("policy", "PodSecurityPolicy") => 2,
        ("apps", _) | ("batch", _) | ("", "Pod" | "Service" | "ReplicationController") => 3,
        _ => 4,
    }
}

/// The wave of an object: its annotation (ours, else Argo CD's), or 0.
pub fn wave(obj: &Value) -> i64 {
    let annotations = &obj["metadata"]["annotations"];
    [WAVE_ANNOTATION, ARGO_WAVE_ANNOTATION]
        .iter()
        .find_map(|a| annotations[*a].as_str())
        .and_then(|w| w.trim().parse().ok())
        .unwrap_or(0)
}

/// The apply order cut into waves: (wave, indices in apply order), lowest wave first. A sync
/// applies a wave only once every object of the previous one is Healthy.
pub fn waves(objects: &[Value]) -> Vec<(i64, Vec<usize>)> {
    let mut out: Vec<(i64, Vec<usize>)> = Vec::new();
    for i in apply_order(objects) {
        let w = wave(&objects[i]);
        match out.last_mut() {
            Some((last, members)) if *last == w => members.push(i),
            _ => out.push((w, vec![i])),
        }
    }
    out
}

/// The order in which to apply `objects` (indices into it): by wave, then kind rank, then kind,
/// namespace and name, so the plan is deterministic.
pub fn apply_order(objects: &[Value]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..objects.len()).collect();
    idx.sort_by_key(|&i| {
        let o = &objects[i];
        let r = ObjRef::of(o);
        (
            wave(o),
            kind_rank(r.group(), &r.kind),
            r.kind.clone(),
            r.namespace.clone(),
            r.name.clone(),
        )
    });
    idx
}

/// Objects in the previous inventory that are not desired any more, in reverse apply order
/// (custom resources before their CRDs, workloads before their namespace).
pub fn prune_set(inventory: &[ObjRef], desired: &[ObjRef]) -> Vec<ObjRef> {
    let mut doomed: Vec<ObjRef> = inventory
        .iter()
        .filter(|old| !desired.iter().any(|d| d.same_object(old)))
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    doomed.sort_by_key(|r| {
        std::cmp::Reverse((
            kind_rank(r.group(), &r.kind),
            r.kind.clone(),
            r.namespace.clone(),
            r.name.clone(),
        ))
    });
    doomed
}

/// What to do about pruning, given the bundle and the app's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PruneDecision {
    /// Delete these.
    Prune(Vec<ObjRef>),
    /// Prune is off for the app.
    Disabled,
    /// The bundle is empty and the app does not allow that: treated as a mistake, nothing is deleted.
    EmptyBundleRefused,
}

pub fn decide_prune(
    inventory: &[ObjRef],
    desired: &[ObjRef],
    prune: bool,
    allow_empty: bool,
) -> PruneDecision {
    if desired.is_empty() && !allow_empty && !inventory.is_empty() {
        return PruneDecision::EmptyBundleRefused;
    }
    if !prune {
        return PruneDecision::Disabled;
    }
    PruneDecision::Prune(prune_set(inventory, desired))
}

/// Whether a live object is ours to delete: it must carry our app label. An object with the same
/// name that someone else created (or took over) is left alone.
pub fn owned_by(live: &Value, app: &str) -> bool {
    live["metadata"]["labels"][APP_LABEL].as_str() == Some(app)
}

/// The desired object as the agent applies it: app label added, default namespace filled in for
/// namespaced kinds.
pub fn prepare(obj: &Value, app: &str, namespace: Option<&str>) -> Value {
    let mut o = obj.clone();
    o["metadata"]["labels"][APP_LABEL] = Value::String(app.to_string());
    if let Some(ns) = namespace
        && o["metadata"]["namespace"]
            .as_str()
            .is_none_or(str::is_empty)
    {
        o["metadata"]["namespace"] = Value::String(ns.to_string());
    }
    o
}

/// Whether `live` still carries everything `desired` says (extra live fields, defaults and status
/// are fine). Used to tell drift from the noise of controllers writing status.
pub fn satisfies(live: &Value, desired: &Value) -> bool {
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => d.iter().all(|(k, dv)| match l.get(k) {
            Some(lv) => satisfies(lv, dv),
            None => dv.is_null(),
        }),
        (Value::Array(d), Value::Array(l)) => {
            d.len() == l.len() && d.iter().zip(l).all(|(dv, lv)| satisfies(lv, dv))
        }
        // Kubernetes normalizes numbers (1.0 vs 1) and quantities; compare numbers numerically.
        (Value::Number(d), Value::Number(l)) => d.as_f64() == l.as_f64(),
        (d, l) => d == l,
    }
}

/// The part of a desired object that drift detection compares: spec-like content and our
/// labels/annotations, not server-managed metadata.
pub fn drift_view(desired: &Value) -> Value {
    let mut d = desired.clone();
    if let Some(meta) = d["metadata"].as_object_mut() {
        meta.retain(|k, _| k == "labels" || k == "annotations");
    }
    if let Some(o) = d.as_object_mut() {
        o.remove("status");
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(api: &str, kind: &str, ns: &str, name: &str, wave: Option<&str>) -> Value {
        let mut v = json!({"apiVersion": api, "kind": kind, "metadata": {"name": name}});
        if !ns.is_empty() {
            v["metadata"]["namespace"] = json!(ns);
        }
        if let Some(w) = wave {
            v["metadata"]["annotations"] = json!({WAVE_ANNOTATION: w});
        }
        v
    }

    #[test]
    fn earlier_runs_of_a_hook_and_stale_hooks() {
        let named = obj("batch/v1", "Job", "app", "before", None);
        let mut generated = obj("batch/v1", "Job", "app", "", None);
        generated["metadata"]["generateName"] = json!("migrate-");
        let job = |ns: &str, name: &str| ObjRef::of(&obj("batch/v1", "Job", ns, name, None));
        let table = [
            (&named, job("app", "before"), true),
            (&named, job("other", "before"), false),
            (&named, job("app", "before-2"), false),
            (&generated, job("app", "migrate-x7k2p"), true),
            (&generated, job("app", "migration"), false),
            (&generated, job("other", "migrate-x7k2p"), false),
        ];
        for (hook, left, want) in table {
            assert_eq!(earlier_run_of(hook, &left), want, "{left}");
        }
        let cm = ObjRef::of(&obj("v1", "ConfigMap", "app", "before", None));
        assert!(
            !earlier_run_of(&named, &cm),
            "another kind of the same name"
        );
        let left = vec![
            job("app", "before"),
            job("app", "migrate-ab"),
            job("app", "gone"),
        ];
        assert_eq!(
            stale_hooks(&left, &[named.clone(), generated.clone()]),
            vec![job("app", "gone")]
        );
        assert_eq!(
            stale_hooks(&left, &[]),
            left,
            "an app removed: every hook goes"
        );
    }

    #[test]
    fn apply_order_table() {
        let objects = vec![
            obj("example.com/v1", "Widget", "app", "w", None),
            obj("apps/v1", "Deployment", "app", "web", None),
            obj("v1", "Service", "app", "web", None),
            obj("v1", "ConfigMap", "app", "cfg", None),
            obj(
                "rbac.authorization.k8s.io/v1",
                "ClusterRole",
                "",
                "reader",
                None,
            ),
            obj("v1", "Namespace", "", "app", None),
            obj(
                "apiextensions.k8s.io/v1",
                "CustomResourceDefinition",
                "",
                "widgets.example.com",
                None,
            ),
            obj("batch/v1", "Job", "app", "migrate", Some("-1")),
            obj("v1", "ConfigMap", "app", "late", Some("5")),
        ];
        let order: Vec<String> = apply_order(&objects)
            .into_iter()
            .map(|i| ObjRef::of(&objects[i]).to_string())
            .collect();
        assert_eq!(
            order,
            [
                "Job app/migrate",
                "CustomResourceDefinition widgets.example.com",
                "Namespace app",
                "ClusterRole reader",
                "ConfigMap app/cfg",
                "Deployment app/web",
                "Service app/web",
                "Widget app/w",
                "ConfigMap app/late",
            ]
        );
    }

    #[test]
    fn waves_group_the_apply_order_and_argo_annotations_count() {
        let mut argo = obj("v1", "ConfigMap", "app", "argo", None);
        argo["metadata"]["annotations"] = json!({ARGO_WAVE_ANNOTATION: "2"});
        let objects = vec![
            obj("v1", "ConfigMap", "app", "late", Some("1")),
            obj("apps/v1", "Deployment", "app", "web", None),
            obj("batch/v1", "Job", "app", "migrate", Some("-1")),
            argo,
            obj("v1", "Namespace", "", "app", None),
        ];
        let names = |idx: &[usize]| -> Vec<String> {
            idx.iter().map(|i| ObjRef::of(&objects[*i]).name).collect()
        };
        let got: Vec<(i64, Vec<String>)> = waves(&objects)
            .into_iter()
            .map(|(w, idx)| (w, names(&idx)))
            .collect();
        assert_eq!(
            got,
            [
                (-1, vec!["migrate".to_string()]),
                (0, vec!["app".to_string(), "web".to_string()]),
                (1, vec!["late".to_string()]),
                (2, vec!["argo".to_string()]),
            ]
        );
        assert_eq!(waves(&[]), Vec::<(i64, Vec<usize>)>::new());
    }

    #[test]
    fn delete_policies_default_to_before_hook_creation() {
        let with = |a: serde_json::Value| json!({"metadata": {"name": "h", "annotations": a}});
        assert_eq!(
            delete_policies(&with(json!({}))),
            [DeletePolicy::BeforeHookCreation]
        );
        assert_eq!(
            delete_policies(&with(
                json!({HELM_HOOK_DELETE_ANNOTATION: "hook-succeeded"})
            )),
            [DeletePolicy::HookSucceeded]
        );
    }

    #[test]
    fn prune_set_is_what_left_in_reverse_order() {
        let r = |api: &str, kind: &str, ns: &str, name: &str| {
            ObjRef::of(&obj(api, kind, ns, name, None))
        };
        let inventory = vec![
            r(
                "apiextensions.k8s.io/v1",
                "CustomResourceDefinition",
                "",
                "widgets.example.com",
            ),
            r("example.com/v1", "Widget", "app", "w"),
            r("v1", "Namespace", "", "app"),
            r("apps/v1", "Deployment", "app", "web"),
            r("v1", "ConfigMap", "app", "cfg"),
        ];
        let desired = vec![r("apps/v1", "Deployment", "app", "web")];
        let doomed: Vec<String> = prune_set(&inventory, &desired)
            .into_iter()
            .map(|o| o.to_string())
            .collect();
        assert_eq!(
            doomed,
            [
                "Widget app/w",
                "ConfigMap app/cfg",
                "Namespace app",
                "CustomResourceDefinition widgets.example.com"
            ]
        );
        // An API version change is the same object, not a prune.
        let moved = vec![r("apps/v1beta2", "Deployment", "app", "web")];
        assert!(
            !prune_set(&[r("apps/v1", "Deployment", "app", "web")], &moved)
                .iter()
                .any(|o| o.kind == "Deployment")
        );
    }

    #[test]
    fn empty_bundles_prune_nothing_unless_allowed() {
        let inv = vec![ObjRef::of(&obj("v1", "ConfigMap", "a", "x", None))];
        assert_eq!(
            decide_prune(&inv, &[], true, false),
            PruneDecision::EmptyBundleRefused
        );
        assert_eq!(
            decide_prune(&inv, &[], true, true),
            PruneDecision::Prune(inv.clone())
        );
        assert_eq!(
            decide_prune(&inv, &[], false, true),
            PruneDecision::Disabled
        );
    }

    #[test]
    fn drift_is_a_change_to_what_we_set_not_to_what_others_add() {
        let desired = json!({"metadata": {"name": "c", "labels": {"a": "1"}}, "data": {"k": "v"}, "spec": {"replicas": 2}});
        let view = drift_view(&desired);
        let live = json!({"metadata": {"name": "c", "uid": "x", "labels": {"a": "1", "extra": "y"}}, "data": {"k": "v"},
                          "spec": {"replicas": 2.0, "strategy": {}}, "status": {"ready": 1}});
        assert!(satisfies(&live, &view));
        let mut edited = live.clone();
        edited["data"]["k"] = json!("changed");
        assert!(!satisfies(&edited, &view));
        let mut unlabelled = live;
        unlabelled["metadata"]["labels"] = json!({});
        assert!(!satisfies(&unlabelled, &view));
    }

    #[test]
    fn only_labelled_objects_are_ours() {
        assert!(owned_by(
            &json!({"metadata": {"labels": {APP_LABEL: "shop"}}}),
            "shop"
        ));
        assert!(!owned_by(
            &json!({"metadata": {"labels": {APP_LABEL: "other"}}}),
            "shop"
        ));
        assert!(!owned_by(&json!({"metadata": {}}), "shop"));
        let p = prepare(&obj("v1", "ConfigMap", "", "c", None), "shop", Some("dflt"));
        assert_eq!(p["metadata"]["namespace"], "dflt");
        assert_eq!(p["metadata"]["labels"][APP_LABEL], "shop");
    }
}
