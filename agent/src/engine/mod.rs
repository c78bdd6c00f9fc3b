//! The reconcile engine: makes a cluster match an app's bundle through the `kube` crate, in order,
//! with pruning, health, and drift healing. Decisions live in [`plan`] and [`health`] (pure); this
//! module does the IO.

pub mod cache_mirror;
pub mod diff;
pub mod health;
mod hooks;
pub mod inventory;
pub mod plan;
pub mod progress;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{ApiCapabilities, Scope};
use kube::runtime::watcher;
use serde_json::Value;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::{Error, Result};
use flotilla_proto::v1::{HookRun, SyncStatus};
use health::{Health, HealthStatus};
use inventory::{Inventory, LocalCache};
use plan::{ObjRef, PruneDecision};
pub use progress::Progress;

fn now_ms() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

/// The field manager of everything the agent applies.
pub const FIELD_MANAGER: &str = "flotilla-agent";

/// How an app is to be reconciled.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AppSpec {
    pub name: String,
    /// Where namespaced objects without a namespace go.
    pub namespace: String,
    pub prune: bool,
    pub allow_empty: bool,
    /// Create the namespaces the bundle's objects need and the bundle does not define.
    #[serde(default)]
    pub create_namespace: bool,
    /// Manual sync: nothing is applied but on an operator's request; the difference is reported.
    #[serde(default)]
    pub manual: bool,
    /// Drift is re-applied as soon as it is seen; off, it is reported (OutOfSync, with a diff).
    #[serde(default = "yes")]
    pub self_heal: bool,
}

fn yes() -> bool {
    true
}

/// What happened to one object.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Applied,
    /// Why it could not be applied (or pruned), in words that do not repeat the object's name.
    Failed(String),
    /// A hook that ran and failed (it is not one of the app's objects), and why.
    HookFailed(String),
    Pruned,
    /// Left alone: in the old inventory but no longer labelled as ours.
    Skipped(String),
}

/// The result of one reconcile pass.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub digest: String,
    pub objects: Vec<(ObjRef, Outcome)>,
    /// Set when pruning was refused (empty bundle) or disabled, in words.
    pub prune_note: Option<String>,
    /// How many of `objects` (the first ones) are the bundle's; the rest are prunes.
    pub bundle_len: usize,
    /// Namespaces created for the bundle (`createNamespace`).
    pub created_namespaces: Vec<String>,
    /// The hooks this pass ran, in order (none when the revision's hooks ran already).
    pub hooks: Vec<HookRun>,
}

impl Report {
    pub fn failed(&self) -> usize {
        self.objects
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Failed(_) | Outcome::HookFailed(_)))
            .count()
    }
    pub fn count(&self, pred: impl Fn(&Outcome) -> bool) -> usize {
        self.objects.iter().filter(|(_, o)| pred(o)).count()
    }

    /// The bundle's objects (what was applied or failed to, not what was pruned), each with its
    /// apply error: what the app's health is computed over.
    pub fn bundle_objects(&self) -> Vec<(ObjRef, Option<String>)> {
        self.objects
            .iter()
            .take(self.bundle_len)
            .map(|(r, o)| {
                let err = match o {
                    Outcome::Failed(e) => Some(format!("not applied: {e}")),
                    Outcome::HookFailed(e) => Some(e.clone()),
                    _ => None,
                };
                (r.clone(), err)
            })
            .collect()
    }

    /// Synced when every object of the bundle was applied; Failed otherwise.
    pub fn sync(&self) -> SyncStatus {
        let failed = self
            .objects
            .iter()
            .take(self.bundle_len)
            .any(|(_, o)| matches!(o, Outcome::Failed(_) | Outcome::HookFailed(_)));
        if failed {
            SyncStatus::Failed
        } else {
            SyncStatus::Synced
        }
    }
}

/// What a sync would change ([`Engine::diff`]).
#[derive(Debug, Clone, Default)]
pub struct Difference {
    /// How many objects would change (created, changed or pruned).
    pub differing: usize,
    /// The unified diff, bounded ([`diff::MAX_DIFF_BYTES`]).
    pub text: String,
    /// The bundle's resource objects, as refs (what the app's health is judged over).
    pub objects: Vec<ObjRef>,
}

pub use flotilla_bundle::digest;

/// What the drift watch saw on one of an app's objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen<'a> {
    /// It changed and still matches what was applied: its status may have moved, so health may
    /// have (the fleet reports health on this rather than waiting for its next tick).
    Changed(&'a ObjRef),
    /// It no longer matches, for the `count`th time in this watch; `healed` when re-applied (not
    /// for manual apps, nor with selfHeal off).
    Drift {
        object: &'a ObjRef,
        count: u64,
        healed: bool,
    },
}

/// Applies bundles to one cluster.
pub struct Engine {
    client: kube::Client,
    resources: Mutex<HashMap<String, (ApiResource, ApiCapabilities)>>,
    cache: Option<LocalCache>,
    /// How messages name the cluster ("cluster eu-1").
    cluster: String,
    /// The cluster's name in the fleet, once known.
    name: Option<String>,
}

/// How long a sync waits for one wave to become Healthy before it stops.
const WAVE_TIMEOUT: Duration = Duration::from_secs(300);

/// The message for an object whose namespace is missing and will not be created.
pub fn missing_namespace(ns: &str) -> String {
    format!("namespace {ns} does not exist; create it or set spec.syncPolicy.createNamespace")
}

fn gvk_of(obj: &Value) -> GroupVersionKind {
    let api_version = obj["apiVersion"].as_str().unwrap_or("");
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    GroupVersionKind::gvk(group, version, obj["kind"].as_str().unwrap_or(""))
}

impl Engine {
    pub fn new(client: kube::Client, cache: Option<LocalCache>) -> Self {
        Self {
            client,
            resources: Mutex::new(HashMap::new()),
            cache,
            cluster: "the cluster".into(),
            name: None,
        }
    }

    /// Names the cluster in messages ("no API resource for ... in cluster eu-1").
    pub fn for_cluster(mut self, name: &str) -> Self {
        self.cluster = format!("cluster {name}");
        self.name = Some(name.to_string());
        self
    }

    /// The cluster's name in the fleet, when known (registered).
    pub fn cluster_name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    pub fn cache(&self) -> Option<&LocalCache> {
        self.cache.as_ref()
    }

    /// The API resource for a kind, from discovery of its group version (cached; a miss asks again,
    /// so a CRD applied a moment ago is found).
    async fn resolve(&self, gvk: &GroupVersionKind) -> Result<(ApiResource, ApiCapabilities)> {
        let key = format!("{}/{}/{}", gvk.group, gvk.version, gvk.kind);
        if let Some(found) = self.resources.lock().await.get(&key) {
            return Ok(found.clone());
        }
        let found = match kube::discovery::pinned_kind(&self.client, gvk).await {
            Ok(found) => found,
            // The group version is not served, or it is but has no such kind: a missing CRD.
            Err(kube::Error::Api(s)) if s.code == 404 => return Err(self.no_resource(gvk)),
            Err(kube::Error::Discovery(_)) => return Err(self.no_resource(gvk)),
            Err(e) => return Err(Error::kube("discovery", e)),
        };
        self.resources.lock().await.insert(key, found.clone());
        Ok(found)
    }

    fn no_resource(&self, gvk: &GroupVersionKind) -> Error {
        Error::NoResource {
            kind: gvk.kind.clone(),
            api_version: if gvk.group.is_empty() {
                gvk.version.clone()
            } else {
                format!("{}/{}", gvk.group, gvk.version)
            },
            cluster: self.cluster.clone(),
        }
    }

    fn api(&self, ar: &ApiResource, caps: &ApiCapabilities, namespace: &str) -> Api<DynamicObject> {
        if caps.scope == Scope::Namespaced {
            Api::namespaced_with(self.client.clone(), namespace, ar)
        } else {
            Api::all_with(self.client.clone(), ar)
        }
    }

    /// The object as it will be applied, and its ref (scope from discovery when known).
    async fn desired(&self, app: &AppSpec, obj: &Value) -> (Value, ObjRef) {
        let namespaced = match self.resolve(&gvk_of(obj)).await {
            Ok((_, caps)) => caps.scope == Scope::Namespaced,
            // Not served yet (a CR whose CRD comes in this bundle): custom resources are namespaced
            // far more often than not; the ref is corrected on the next pass.
            Err(_) => obj["metadata"]["namespace"].is_string() || obj["kind"] != "Namespace",
        };
        let mut prepared =
            plan::prepare(obj, &app.name, namespaced.then_some(app.namespace.as_str()));
        if !namespaced && let Some(m) = prepared["metadata"].as_object_mut() {
            m.remove("namespace");
        }
        let r = ObjRef::of(&prepared);
        (prepared, r)
    }

    /// The last inventory of `app`: in-cluster, else the local cache.
    pub async fn inventory(&self, app: &str) -> Result<Inventory> {
        if let Some(inv) = inventory::read(&self.client, app).await? {
            return Ok(inv);
        }
        Ok(self
            .cache
            .as_ref()
            .map(|c| c.inventory(app))
            .transpose()?
            .flatten()
            .unwrap_or_default())
    }

    /// Forgets a removed app whose objects were pruned: its inventory, in the cluster and cached.
    pub async fn forget(&self, app: &str) -> Result<()> {
        inventory::delete(&self.client, app).await?;
        if let Some(cache) = &self.cache {
            cache.forget(app).await?;
        }
        Ok(())
    }

    /// Records that the operator's sync request `id` for `app` was carried out.
    pub async fn mark_sync_request(&self, app: &str, id: u64) -> Result<()> {
        let mut inv = self.inventory(app).await?;
        if inv.sync_request != id {
            inv.sync_request = id;
            self.save_inventory(app, &inv).await?;
        }
        Ok(())
    }

    async fn save_inventory(&self, app: &str, inv: &Inventory) -> Result<()> {
        if let Some(cache) = &self.cache {
            cache.save_inventory(app, inv).await?;
        }
        inventory::write(&self.client, app, inv).await
    }

    /// One reconcile pass: apply every object in order, prune what left, record the inventory.
    /// `progress` is told about each object as it is done, and what the pass waits on meanwhile.
    pub async fn reconcile(
        &self,
        app: &AppSpec,
        objects: &[Value],
        mut progress: impl FnMut(Progress<'_>) + Send,
    ) -> Result<Report> {
        let progress: &mut (dyn FnMut(Progress<'_>) + Send) = &mut progress;
        let digest = digest(objects);
        let old = self.inventory(&app.name).await?;
        // Hooks run once per new revision and are never tracked, healed or pruned as resources;
        // `Skip`ped objects are not applied at all.
        let mut hooks: Vec<(Vec<plan::HookPhase>, Value)> = Vec::new();
        let mut resources: Vec<&Value> = Vec::new();
        for obj in objects {
            match plan::role(obj) {
                plan::Role::Resource => resources.push(obj),
                plan::Role::Hook(phases) => hooks.push((phases, self.desired(app, obj).await.0)),
                plan::Role::Skipped => {}
            }
        }
        // The hooks of this bundle ran to completion only if the last sync that ran hooks was of
        // this bundle: a pass of any other bundle forgets it, so a revert to an earlier bundle
        // runs its hooks anew.
        let hooks_synced_before = old.hooks_synced.clone().filter(|d| *d == digest);
        let hooks_due = !hooks.is_empty() && hooks_synced_before.is_none();
        let hooks_of = |phase: plan::HookPhase| -> Vec<Value> {
            hooks
                .iter()
                .filter(|(p, _)| p.contains(&phase))
                .map(|(_, o)| o.clone())
                .collect()
        };
        let mut hooks_left = old.hooks.clone();
        let mut desired = Vec::with_capacity(resources.len());
        for obj in &resources {
            desired.push(self.desired(app, obj).await);
        }
        let desired_refs: Vec<ObjRef> = desired.iter().map(|(_, r)| r.clone()).collect();

        // Crash safety: record everything we may create before creating it, so an agent killed
        // mid-apply still knows (and can later prune) every object it touched.
        let mut union = old.objects.clone();
        for r in &desired_refs {
            if !union.iter().any(|o| o.same_object(r)) {
                union.push(r.clone());
            }
        }
        self.save_inventory(
            &app.name,
            &Inventory {
                digest: old.digest.clone(),
                objects: union.clone(),
                hooks_synced: hooks_synced_before.clone(),
                sync_request: old.sync_request,
                hooks: hooks_left.clone(),
            },
        )
        .await?;

        let mut report = Report {
            digest: digest.clone(),
            bundle_len: desired.len(),
            ..Report::default()
        };
        let (blocked, created) = self.preflight(app, &desired_refs).await?;
        report.created_namespaces = created;
        // Sync hooks run in their wave, among the resources (indices past the resources').
        let sync_hooks = if hooks_due {
            hooks_of(plan::HookPhase::Sync)
        } else {
            Vec::new()
        };
        let mut values: Vec<Value> = desired.iter().map(|(v, _)| v.clone()).collect();
        values.extend(sync_hooks.iter().cloned());
        let mut final_refs = Vec::with_capacity(desired.len());
        let waves = plan::waves(&values);
        // Why the sync stopped before the last wave, if it did.
        let mut stopped: Option<String> = None;
        let mut runs = Vec::new();
        if hooks_due {
            let pre = hooks_of(plan::HookPhase::PreSync);
            if let Err((r, why)) = self
                .run_hooks(
                    app,
                    &pre,
                    plan::HookPhase::PreSync,
                    &mut runs,
                    &mut hooks_left,
                    progress,
                )
                .await
            {
                stopped = Some(format!("PreSync hook {r} failed: {why}"));
                report.objects.push((
                    r,
                    Outcome::HookFailed(format!("PreSync hook failed: {why}")),
                ));
                report.bundle_len += 1;
            }
        }
        for (n, (wave, indices)) in waves.iter().enumerate() {
            let mut applied = Vec::new();
            let mut failed: Option<(ObjRef, String)> = None;
            let mut wave_hooks = Vec::new();
            for &i in indices {
                let Some((obj, r)) = desired.get(i) else {
                    wave_hooks.push(values[i].clone());
                    continue;
                };
                let (outcome, r) = match (&stopped, blocked.get(r)) {
                    (Some(why), _) => (Outcome::Failed(why.clone()), r.clone()),
                    (None, Some(why)) => (Outcome::Failed(why.clone()), r.clone()),
                    (None, None) => match self.apply_one(app, obj).await {
                        Ok(r) => (Outcome::Applied, r),
                        Err(e) => (Outcome::Failed(e.to_string()), ObjRef::of(obj)),
                    },
                };
                match &outcome {
                    Outcome::Applied => applied.push((r.clone(), None)),
                    Outcome::Failed(e) if failed.is_none() => failed = Some((r.clone(), e.clone())),
                    _ => {}
                }
                progress(Progress::Done(&r, &outcome));
                final_refs.push(r.clone());
                report.objects.push((r, outcome));
            }
            if stopped.is_none()
                && failed.is_none()
                && !wave_hooks.is_empty()
                && let Err((r, why)) = self
                    .run_hooks(
                        app,
                        &wave_hooks,
                        plan::HookPhase::Sync,
                        &mut runs,
                        &mut hooks_left,
                        progress,
                    )
                    .await
            {
                stopped = Some(format!("Sync hook {r} (wave {wave}) failed: {why}"));
                report
                    .objects
                    .push((r, Outcome::HookFailed(format!("Sync hook failed: {why}"))));
                report.bundle_len += 1;
            }
            // A later wave starts only once every object of this one is Healthy (Jobs complete).
            if stopped.is_some() || n + 1 == waves.len() {
                continue;
            }
            if let Some((r, e)) = failed {
                stopped = Some(format!("sync stopped at wave {wave}: {r} failed: {e}"));
                continue;
            }
            let label = format!("wave {} of {} (sync-wave {wave})", n + 1, waves.len());
            let (h, _) = self
                .wait_healthy_telling(&app.name, &applied, WAVE_TIMEOUT, &label, progress)
                .await;
            if h.state != HealthStatus::Healthy {
                stopped = Some(format!(
                    "sync stopped at wave {wave}: not Healthy ({}): {}",
                    h.state, h.message
                ));
            }
        }
        let mut hooks_synced = hooks_synced_before.clone();
        let fail_hooks = hooks_of(plan::HookPhase::SyncFail);
        let mut sync_failed = hooks_due && stopped.is_some();
        if hooks_due && stopped.is_none() {
            let post = hooks_of(plan::HookPhase::PostSync);
            let mut outcome = if report.sync() == SyncStatus::Synced {
                Ok(())
            } else {
                Err(None)
            };
            if outcome.is_ok() && !post.is_empty() {
                // PostSync runs once every resource is Healthy.
                let objects: Vec<(ObjRef, Option<String>)> =
                    final_refs.iter().map(|r| (r.clone(), None)).collect();
                let (h, _) = self
                    .wait_healthy_telling(
                        &app.name,
                        &objects,
                        WAVE_TIMEOUT,
                        "before PostSync hooks",
                        progress,
                    )
                    .await;
                outcome = if h.state == HealthStatus::Healthy {
                    self.run_hooks(
                        app,
                        &post,
                        plan::HookPhase::PostSync,
                        &mut runs,
                        &mut hooks_left,
                        progress,
                    )
                    .await
                    .map_err(Some)
                } else {
                    Err(None)
                };
            }
            match outcome {
                Ok(()) => hooks_synced = Some(digest.clone()),
                Err(failed) => {
                    if let Some((r, why)) = failed {
                        report.objects.push((
                            r,
                            Outcome::HookFailed(format!("PostSync hook failed: {why}")),
                        ));
                        report.bundle_len += 1;
                    }
                    sync_failed = true;
                }
            }
        }
        if sync_failed {
            // The sync has failed already; a failing SyncFail hook is reported in `runs`, and
            // logged.
            if let Err((r, why)) = self
                .run_hooks(
                    app,
                    &fail_hooks,
                    plan::HookPhase::SyncFail,
                    &mut runs,
                    &mut hooks_left,
                    progress,
                )
                .await
            {
                tracing::warn!(app = %app.name, hook = %r, why, "a SyncFail hook failed");
            }
        }
        report.hooks = runs;
        if let Some(why) = stopped {
            // Nothing is pruned by a sync that did not finish; the inventory keeps every object,
            // and the hook objects this pass left.
            report.prune_note = Some(format!("{why}; nothing was pruned"));
            if hooks_left != old.hooks {
                self.save_inventory(
                    &app.name,
                    &Inventory {
                        digest: old.digest.clone(),
                        objects: union,
                        hooks_synced,
                        sync_request: old.sync_request,
                        hooks: hooks_left,
                    },
                )
                .await?;
            }
            return Ok(report);
        }

        let hook_values: Vec<Value> = hooks.iter().map(|(_, h)| h.clone()).collect();
        match plan::decide_prune(&old.objects, &final_refs, app.prune, app.allow_empty) {
            PruneDecision::EmptyBundleRefused => {
                report.prune_note = Some("the bundle is empty and the app does not allow empty bundles: nothing was pruned".into());
                let keep = Inventory {
                    digest: old.digest.clone(),
                    objects: old.objects.clone(),
                    hooks_synced,
                    sync_request: old.sync_request,
                    hooks: hooks_left,
                };
                self.save_inventory(&app.name, &keep).await?;
                return Ok(report);
            }
            PruneDecision::Disabled => {
                report.prune_note =
                    Some("prune is off: objects that left the bundle were kept".into());
                let mut kept = final_refs.clone();
                kept.extend(plan::prune_set(&old.objects, &final_refs));
                self.save_inventory(
                    &app.name,
                    &Inventory {
                        digest,
                        objects: kept,
                        hooks_synced,
                        sync_request: old.sync_request,
                        hooks: hooks_left,
                    },
                )
                .await?;
                return Ok(report);
            }
            PruneDecision::Prune(mut doomed) => {
                // Hook objects no hook of the bundle accounts for go too (the app's removal
                // takes every hook Job it left).
                let stale = plan::stale_hooks(&hooks_left, &hook_values);
                hooks_left.retain(|l| !stale.contains(l));
                doomed.extend(stale.iter().cloned());
                let mut still_tracked = final_refs.clone();
                for r in doomed {
                    let outcome = self.prune_one(app, &r).await;
                    if matches!(outcome, Outcome::Failed(_)) {
                        if stale.contains(&r) {
                            hooks_left.push(r.clone());
                        } else {
                            still_tracked.push(r.clone());
                        }
                    }
                    progress(Progress::Done(&r, &outcome));
                    report.objects.push((r, outcome));
                }
                self.save_inventory(
                    &app.name,
                    &Inventory {
                        digest,
                        objects: still_tracked,
                        hooks_synced,
                        sync_request: old.sync_request,
                        hooks: hooks_left,
                    },
                )
                .await?;
            }
        }
        Ok(report)
    }

    /// The refs of the bundle's resource objects as they are applied (namespace defaulted).
    pub async fn refs(&self, app: &AppSpec, objects: &[Value]) -> Vec<ObjRef> {
        let mut out = Vec::new();
        for obj in objects
            .iter()
            .filter(|o| plan::role(o) == plan::Role::Resource)
        {
            out.push(self.desired(app, obj).await.1);
        }
        out
    }

    /// What a sync of `objects` would change, without changing anything: each resource object's
    /// live state against the server's dry run of its apply, and (with prune) the objects of the
    /// inventory that would be deleted. Hooks are not compared (they run only in a sync).
    pub async fn diff(&self, app: &AppSpec, objects: &[Value]) -> Result<Difference> {
        let mut out = diff::Bounded::default();
        let mut refs = Vec::new();
        for obj in objects
            .iter()
            .filter(|o| plan::role(o) == plan::Role::Resource)
        {
            let (prepared, r) = self.desired(app, obj).await;
            refs.push(r.clone());
            let (ar, caps) = match self.resolve(&gvk_of(&prepared)).await {
                Ok(found) => found,
                Err(e) => {
                    out.note(&r, &format!("to be created; {e}"));
                    continue;
                }
            };
            let api = self.api(&ar, &caps, &r.namespace);
            let live = match api.get_opt(&r.name).await {
                Ok(live) => live.map(|l| serde_json::to_value(l).unwrap_or_default()),
                Err(e) => {
                    out.note(&r, &Error::kube("reading it", e).to_string());
                    continue;
                }
            };
            let params = PatchParams::apply(FIELD_MANAGER).force().dry_run();
            let dry = match api.patch(&r.name, &params, &Patch::Apply(&prepared)).await {
                Ok(d) => serde_json::to_value(d).unwrap_or_default(),
                Err(e) => {
                    out.note(&r, &Error::kube("dry-run apply", e).to_string());
                    continue;
                }
            };
            let change = diff::Change {
                object: &r,
                live: live.as_ref(),
                desired: Some(&dry),
            };
            if let Some(d) = diff::object_diff(&change) {
                out.push(&r, d);
            }
        }
        if app.prune {
            let old = self.inventory(&app.name).await?;
            for r in plan::prune_set(&old.objects, &refs) {
                let gvk = gvk_of(&serde_json::json!({"apiVersion": r.api_version, "kind": r.kind}));
                let Ok((ar, caps)) = self.resolve(&gvk).await else {
                    continue;
                };
                let api = self.api(&ar, &caps, &r.namespace);
                let Ok(Some(live)) = api.get_opt(&r.name).await else {
                    continue;
                };
                let live = serde_json::to_value(live).unwrap_or_default();
                if !plan::owned_by(&live, &app.name) {
                    continue;
                }
                let change = diff::Change {
                    object: &r,
                    live: Some(&live),
                    desired: None,
                };
                if let Some(d) = diff::object_diff(&change) {
                    out.push(&r, d);
                }
            }
        }
        Ok(Difference {
            differing: out.differing(),
            text: out.finish(),
            objects: refs,
        })
    }

    /// Decides, before anything is written, which objects cannot be applied and why: objects in a
    /// namespace that does not exist (created instead with `createNamespace`), and objects another
    /// Flotilla app owns. One GET per namespace and one labelled LIST per kind.
    async fn preflight(
        &self,
        app: &AppSpec,
        refs: &[ObjRef],
    ) -> Result<(HashMap<ObjRef, String>, Vec<String>)> {
        let mut blocked = HashMap::new();
        let mut created = Vec::new();
        let in_bundle: BTreeSet<&str> = refs
            .iter()
            .filter(|r| r.group().is_empty() && r.kind == "Namespace")
            .map(|r| r.name.as_str())
            .collect();
        let needed: BTreeSet<&str> = refs
            .iter()
            .map(|r| r.namespace.as_str())
            .filter(|ns| !ns.is_empty() && !in_bundle.contains(ns))
            .collect();
        let namespaces: Api<DynamicObject> = Api::all_with(
            self.client.clone(),
            &ApiResource::erase::<k8s_openapi::api::core::v1::Namespace>(&()),
        );
        for ns in needed {
            let why = match namespaces.get_opt(ns).await {
                Ok(Some(_)) => continue,
                // Not allowed to read namespaces (a namespaced install): let the apply tell.
                Err(kube::Error::Api(s)) if s.code == 403 => continue,
                Err(e) => Error::kube(&format!("reading namespace {ns}"), e).to_string(),
                Ok(None) if !app.create_namespace => missing_namespace(ns),
                Ok(None) => match self.create_namespace(&namespaces, app, ns).await {
                    Ok(()) => {
                        created.push(ns.to_string());
                        continue;
                    }
                    Err(e) => format!("creating namespace {ns} (createNamespace): {e}"),
                },
            };
            for r in refs.iter().filter(|r| r.namespace == ns) {
                blocked.insert(r.clone(), why.clone());
            }
        }
        for (r, owner) in self.owned_elsewhere(app, refs).await? {
            blocked.entry(r).or_insert_with(|| {
                format!(
                    "already owned by app {owner} (label {}={owner}); an object belongs to one app: remove it from one of them",
                    plan::APP_LABEL
                )
            });
        }
        Ok((blocked, created))
    }

    /// A namespace for the bundle, labelled as created by Flotilla for `app`. It carries no app
    /// label, so it is never part of an inventory and never pruned with the app.
    async fn create_namespace(
        &self,
        api: &Api<DynamicObject>,
        app: &AppSpec,
        ns: &str,
    ) -> Result<()> {
        let obj = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": ns, "labels": {plan::CREATED_BY_LABEL: app.name}},
        });
        api.patch(ns, &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&obj))
            .await
            .map_err(|e| Error::kube("server-side apply", e))?;
        tracing::info!(app = %app.name, namespace = ns, "created namespace (createNamespace)");
        Ok(())
    }

    /// Objects of the bundle that carry another app's label, with that app's name.
    async fn owned_elsewhere(
        &self,
        app: &AppSpec,
        refs: &[ObjRef],
    ) -> Result<Vec<(ObjRef, String)>> {
        let selector = format!("{0},{0}!={1}", plan::APP_LABEL, app.name);
        let mut kinds: Vec<(&str, &str)> = refs
            .iter()
            .map(|r| (r.api_version.as_str(), r.kind.as_str()))
            .collect();
        kinds.sort();
        kinds.dedup();
        let mut out = Vec::new();
        for (api_version, kind) in kinds {
            let gvk = gvk_of(&serde_json::json!({"apiVersion": api_version, "kind": kind}));
            // Not served yet (its CRD comes in this bundle): nobody can own one.
            let Ok((ar, _)) = self.resolve(&gvk).await else {
                continue;
            };
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
            let list = api
                .list(&kube::api::ListParams::default().labels(&selector))
                .await
                .map_err(|e| Error::kube(&format!("listing {kind} owned by other apps"), e))?;
            for item in list.items {
                let owner = item
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(plan::APP_LABEL))
                    .cloned()
                    .unwrap_or_default();
                let namespace = item.metadata.namespace.clone().unwrap_or_default();
                let name = item.metadata.name.clone().unwrap_or_default();
                if let Some(r) = refs.iter().find(|r| {
                    r.kind == kind
                        && r.api_version == api_version
                        && r.namespace == namespace
                        && r.name == name
                }) {
                    out.push((r.clone(), owner));
                }
            }
        }
        Ok(out)
    }

    async fn apply_one(&self, _app: &AppSpec, obj: &Value) -> Result<ObjRef> {
        let gvk = gvk_of(obj);
        let (ar, caps) = self.resolve(&gvk).await?;
        let r = ObjRef::of(obj);
        let api = self.api(&ar, &caps, &r.namespace);
        let applied = api
            .patch(
                &r.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(obj),
            )
            .await
            .map_err(|e| Error::kube("server-side apply", e))?;
        if gvk.group == "apiextensions.k8s.io" && gvk.kind == "CustomResourceDefinition" {
            self.wait_established(&api, &r, &applied).await?;
        }
        Ok(r)
    }

    async fn wait_established(
        &self,
        api: &Api<DynamicObject>,
        r: &ObjRef,
        first: &DynamicObject,
    ) -> Result<()> {
        let established = |o: &DynamicObject| {
            o.data["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Established" && c["status"] == "True")
            })
        };
        if established(first) {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let o = api
                .get(&r.name)
                .await
                .map_err(|e| Error::kube(&format!("waiting for {r}"), e))?;
            if established(&o) {
                return Ok(());
            }
        }
        Err(Error::Timeout(format!(
            "{r} was not Established within 30s"
        )))
    }

    async fn prune_one(&self, app: &AppSpec, r: &ObjRef) -> Outcome {
        let gvk = gvk_of(&serde_json::json!({"apiVersion": r.api_version, "kind": r.kind}));
        let (ar, caps) = match self.resolve(&gvk).await {
            Ok(found) => found,
            // The kind is gone (its CRD was pruned first or removed): so are its objects.
            Err(Error::NoResource { .. }) => return Outcome::Pruned,
            // Discovery failed (the API server is away): unknown, so the object stays in the
            // inventory and the next pass tries again.
            Err(e) => return Outcome::Failed(format!("resolving its kind for prune: {e}")),
        };
        let api = self.api(&ar, &caps, &r.namespace);
        let live = match api.get_opt(&r.name).await {
            Ok(Some(live)) => live,
            Ok(None) => return Outcome::Pruned,
            Err(e) => return Outcome::Failed(Error::kube("reading it for prune", e).to_string()),
        };
        let live_value = serde_json::to_value(&live).unwrap_or_default();
        if !plan::owned_by(&live_value, &app.name) {
            return Outcome::Skipped(format!(
                "no longer carries {}={}; left alone",
                plan::APP_LABEL,
                app.name
            ));
        }
        match api.delete(&r.name, &DeleteParams::background()).await {
            Ok(_) => Outcome::Pruned,
            Err(kube::Error::Api(s)) if s.code == 404 => Outcome::Pruned,
            Err(e) => Outcome::Failed(Error::kube("deleting it", e).to_string()),
        }
    }

    /// Health of each object of the bundle and of the app, given each object's apply error (an
    /// object that could not be applied is Degraded). One labelled LIST per kind, not one GET per
    /// object, so judging a thousand objects costs a handful of requests.
    pub async fn health(
        &self,
        app: &str,
        objects: &[(ObjRef, Option<String>)],
    ) -> (Health, Vec<(ObjRef, Health)>) {
        let selector = format!("{}={app}", plan::APP_LABEL);
        let mut live: HashMap<(String, String, String, String), Value> = HashMap::new();
        let mut kinds: Vec<(String, String)> = objects
            .iter()
            .filter(|(_, err)| err.is_none())
            .map(|(r, _)| (r.api_version.clone(), r.kind.clone()))
            .collect();
        kinds.sort();
        kinds.dedup();
        let mut unjudged: HashMap<(String, String), String> = HashMap::new();
        for (api_version, kind) in kinds {
            let gvk = gvk_of(&serde_json::json!({"apiVersion": api_version, "kind": kind}));
            let ar = match self.resolve(&gvk).await {
                Ok((ar, _)) => ar,
                Err(e) => {
                    unjudged.insert((api_version, kind), e.to_string());
                    continue;
                }
            };
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
            let list = match api
                .list(&kube::api::ListParams::default().labels(&selector))
                .await
            {
                Ok(list) => list,
                Err(e) => {
                    let why = Error::kube("listing for health", e).to_string();
                    unjudged.insert((api_version, kind), why);
                    continue;
                }
            };
            for item in list.items {
                let mut value = serde_json::to_value(&item).unwrap_or_default();
                value["apiVersion"] = Value::String(api_version.clone());
                value["kind"] = Value::String(kind.clone());
                let r = ObjRef::of(&value);
                live.insert(
                    (
                        r.group().to_string(),
                        r.kind.clone(),
                        r.namespace.clone(),
                        r.name.clone(),
                    ),
                    value,
                );
            }
        }
        let each: Vec<(ObjRef, Health)> = objects
            .iter()
            .map(|(r, err)| {
                // A kind that could not be read is not known to be anything, least of all Healthy.
                if err.is_none()
                    && let Some(why) = unjudged.get(&(r.api_version.clone(), r.kind.clone()))
                {
                    let h = Health {
                        state: HealthStatus::Unknown,
                        message: why.clone(),
                    };
                    return (r.clone(), h);
                }
                let key = (
                    r.group().to_string(),
                    r.kind.clone(),
                    r.namespace.clone(),
                    r.name.clone(),
                );
                (r.clone(), health::of_object(err.as_deref(), live.get(&key)))
            })
            .collect();
        (health::aggregate(&each), each)
    }

    /// Polls health until the app is Healthy or Degraded, or `timeout` passes.
    pub async fn wait_healthy(
        &self,
        app: &str,
        objects: &[(ObjRef, Option<String>)],
        timeout: Duration,
    ) -> (Health, Vec<(ObjRef, Health)>) {
        self.wait_healthy_telling(app, objects, timeout, "", &mut |_| {})
            .await
    }

    /// [`Engine::wait_healthy`], telling `progress` what it waits on (under `label`) whenever
    /// that changes.
    pub(crate) async fn wait_healthy_telling(
        &self,
        app: &str,
        objects: &[(ObjRef, Option<String>)],
        timeout: Duration,
        label: &str,
        progress: &mut (dyn FnMut(Progress<'_>) + Send),
    ) -> (Health, Vec<(ObjRef, Health)>) {
        let deadline = Instant::now() + timeout;
        let mut told = String::new();
        loop {
            let (overall, each) = self.health(app, objects).await;
            if matches!(
                overall.state,
                HealthStatus::Healthy | HealthStatus::Degraded
            ) || Instant::now() >= deadline
            {
                return (overall, each);
            }
            if let Some(waiting) = progress::waiting_on(label, &each)
                && waiting != told
            {
                progress(Progress::Waiting(&waiting));
                told = waiting;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Keeps `objects` in place until cancelled: watches the app's kinds (by label) and re-applies an
    /// object that was changed or deleted; a full re-apply every `resync` (when given) is the safety
    /// net. The fleet passes none: it runs the full passes itself, so their outcome is reported.
    /// `on_seen` is told of every event on one of the app's objects ([`Seen`]).
    pub async fn keep_in_sync(
        &self,
        app: &AppSpec,
        objects: &[Value],
        resync: Option<Duration>,
        cancel: CancellationToken,
        mut on_seen: impl FnMut(Seen<'_>),
    ) -> Result<()> {
        let mut desired: BTreeMap<ObjRef, Value> = BTreeMap::new();
        let mut kinds: BTreeMap<String, (ApiResource, ApiCapabilities)> = BTreeMap::new();
        for obj in objects
            .iter()
            .filter(|o| plan::role(o) == plan::Role::Resource)
        {
            let (prepared, r) = self.desired(app, obj).await;
            if let Ok(found) = self.resolve(&gvk_of(&prepared)).await {
                kinds.insert(format!("{}/{}", r.api_version, r.kind), found);
            }
            desired.insert(r, prepared);
        }
        let selector = format!("{}={}", plan::APP_LABEL, app.name);
        let streams = kinds.values().map(|(ar, _)| {
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), ar);
            watcher(api, watcher::Config::default().labels(&selector)).boxed()
        });
        let mut events = futures::stream::select_all(streams);
        let mut drift: u64 = 0;
        let mut ticker = tokio::time::interval(resync.unwrap_or(Duration::from_secs(3600)));
        ticker.tick().await;
        loop {
            let event = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = ticker.tick(), if resync.is_some() => {
                    self.reconcile(app, objects, |_| {}).await?;
                    continue;
                }
                event = events.next() => event,
            };
            let Some(event) = event else { return Ok(()) };
            let changed = match event {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                    Some((serde_json::to_value(&o).unwrap_or_default(), false))
                }
                Ok(watcher::Event::Delete(o)) => {
                    Some((serde_json::to_value(&o).unwrap_or_default(), true))
                }
                Ok(_) => None,
                Err(e) => {
                    tracing::debug!(error = %e, "drift watch error; the watcher retries");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    None
                }
            };
            let Some((live, deleted)) = changed else {
                continue;
            };
            let live_ref = ObjRef::of(&live);
            let Some((r, want)) = desired.iter().find(|(r, _)| r.same_object(&live_ref)) else {
                continue;
            };
            if !deleted && plan::satisfies(&live, &plan::drift_view(want)) {
                // Not drift, yet maybe news: a status moved (a rollout became available).
                on_seen(Seen::Changed(r));
                continue;
            }
            if !live["metadata"]["deletionTimestamp"].is_null() && !deleted {
                continue;
            }
            if app.manual || !app.self_heal {
                // Seen, not healed: the caller reports the difference.
                drift += 1;
                on_seen(Seen::Drift {
                    object: r,
                    count: drift,
                    healed: false,
                });
                continue;
            }
            match self.apply_one(app, want).await {
                Ok(_) => {
                    drift += 1;
                    on_seen(Seen::Drift {
                        object: r,
                        count: drift,
                        healed: true,
                    });
                }
                Err(e) => {
                    tracing::warn!(object = %r, error = %e, "could not heal drift; will retry on the next event or resync")
                }
            }
        }
    }
}
