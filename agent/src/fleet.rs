//! The cluster side of a connected agent: turns the hub's assignments into running apps (fetching
//! bundles by digest, verifying and caching them), removes apps that left the assignments (pruning
//! what they had), and publishes each app's status for the session to report.
//!
//! Apps run from the local cache from the start, so a cluster keeps being enforced while the hub is
//! unreachable; assignments that arrive later replace them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_proto::v1::{AppDigest, AppStatus, Assignment, Assignments, HookRun, SyncStatus};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::{Backoff, random_fraction};
pub use crate::board::StatusBoard;
use crate::board::lock;
use crate::credentials::IdentityStore;
use crate::engine::health::{Health, HealthStatus};
use crate::engine::inventory::CachedBundle;
use crate::engine::plan::ObjRef;
use crate::engine::{AppSpec, Engine, Outcome, Progress, Seen};
use crate::leaving::{Fate, fate, leaving};
use crate::link::HubLink;
use crate::pass::{Orders, Pass, pass_for, spec_of, with_difference};
use crate::{Error, Result};

/// The objects of a fetched bundle (its digest already verified): a JSON array of Kubernetes
/// objects, each with an apiVersion, a kind and a name. Anything else is refused whole, so a
/// corrupt or hostile bundle never reaches the cluster.
pub fn decode_bundle(digest: &str, bytes: &[u8]) -> Result<Vec<serde_json::Value>> {
    let objects: Vec<serde_json::Value> = serde_json::from_slice(bytes)
        .map_err(|e| Error::Bundle(format!("bundle {digest}: {e}")))?;
    for (i, o) in objects.iter().enumerate() {
        let named = |v: &serde_json::Value| v.as_str().is_some_and(|s| !s.is_empty());
        // Hooks may carry a generateName instead of a name.
        let hook_named = named(&o["metadata"]["generateName"])
            && matches!(
                crate::engine::plan::role(o),
                crate::engine::plan::Role::Hook(_)
            );
        if !(named(&o["apiVersion"]) && named(&o["kind"]))
            || !(named(&o["metadata"]["name"]) || hook_named)
        {
            return Err(Error::Bundle(format!(
                "bundle {digest}: object {i} lacks an apiVersion, kind or metadata.name"
            )));
        }
    }
    Ok(objects)
}

struct Running {
    orders: Orders,
    cancel: CancellationToken,
}

/// How often the fleet does what no event asks for.
#[derive(Debug, Clone, Copy)]
pub struct Intervals {
    /// A full re-apply of each running app.
    pub resync: Duration,
    /// A settled app's health read again, when the watch saw none of its objects change.
    pub health: Duration,
}

/// The apps this agent runs.
pub struct Fleet {
    engine: Arc<Engine>,
    link: HubLink,
    identity: IdentityStore,
    board: Arc<StatusBoard>,
    intervals: Intervals,
    running: Mutex<HashMap<String, Running>>,
    /// Apps the hub says it cannot read: not enforced, nothing of them deleted (app → why).
    held: Mutex<BTreeMap<String, String>>,
    /// Running apps the hub's last message did not mention (kept; logged once each).
    unmentioned: Mutex<std::collections::BTreeSet<String>>,
    tasks: TaskTracker,
    metrics: Arc<crate::metrics::Metrics>,
    /// One pass of an app at a time: a new bundle's task waits for the old one's pass to stop
    /// (it stops at cancellation), so two passes never replace each other's hook objects.
    passes: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Fleet {
    pub fn new(
        engine: Arc<Engine>,
        link: HubLink,
        identity: IdentityStore,
        board: Arc<StatusBoard>,
        intervals: Intervals,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            engine,
            link,
            identity,
            board,
            intervals,
            running: Mutex::new(HashMap::new()),
            held: Mutex::new(BTreeMap::new()),
            unmentioned: Mutex::new(Default::default()),
            tasks: TaskTracker::new(),
            metrics,
            passes: Mutex::new(HashMap::new()),
        })
    }

    /// The lock a pass of `app` holds.
    fn pass_lock(&self, app: &str) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(lock(&self.passes).entry(app.to_string()).or_default())
    }

    /// What this agent runs now (from its cache), for the session's hello.
    pub fn running_digests(&self) -> Vec<AppDigest> {
        let Some(cache) = self.engine.cache() else {
            return Vec::new();
        };
        // The hello only informs the hub (it decides nothing from it): what cannot be read is left
        // out, and said.
        let apps = match cache.apps() {
            Ok(apps) => apps,
            Err(e) => {
                tracing::warn!(error = %e, "listing cached apps for the hello");
                return Vec::new();
            }
        };
        apps.into_iter()
            .filter_map(|app| cache.bundle(&app).ok().flatten())
            .map(|b| AppDigest {
                app: b.spec.name.clone(),
                digest: b.digest.clone(),
            })
            .collect()
    }

    /// Runs until cancelled: cached apps at once, then whatever the assignments say.
    pub async fn run(
        self: Arc<Self>,
        mut assignments: watch::Receiver<Option<Assignments>>,
        cancel: CancellationToken,
    ) -> Result<()> {
        let cached = self.engine.cache().map(|c| (c, c.apps()));
        if let Some((_, Err(e))) = &cached {
            tracing::error!(error = %e, "the bundle cache cannot be listed; waiting for the hub's assignments");
        }
        if let Some((cache, Ok(apps))) = cached {
            for app in apps {
                match cache.bundle(&app) {
                    Ok(Some(bundle)) => {
                        let orders = Orders::cached(&bundle);
                        self.start(bundle, None, orders, &cancel);
                        // What it knew is enforced from here on, hub or not.
                        self.metrics.enforcing.set(1);
                    }
                    Ok(None) => {}
                    // Unreadable (its key was lost, say): the hub's assignment brings it back.
                    Err(e) => {
                        tracing::warn!(app, error = %e, "cached bundle unreadable; waiting for the hub")
                    }
                }
            }
        }
        // A bundle that could not be fetched (hub busy or restarting) is tried again with jittered
        // backoff, not only at the next assignment.
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            let retry = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                changed = assignments.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    backoff.reset();
                }
                _ = retry => {}
            }
            retry_at = None;
            let desired = assignments.borrow_and_update().clone();
            let Some(desired) = desired else { continue };
            match self.apply_assignments(desired, &cancel).await {
                Ok(true) => {
                    self.metrics.enforcing.set(1);
                    backoff.reset()
                }
                Ok(false) => {
                    let delay = backoff.next_delay(random_fraction());
                    tracing::info!(?delay, "some bundles could not be fetched; retrying");
                    retry_at = Some(tokio::time::Instant::now() + delay);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "applying assignments; the next assignment or resync retries");
                }
            }
        }
        self.tasks.close();
        self.tasks.wait().await;
        Ok(())
    }

    /// Starts what changed, prunes what the hub removed, holds what it cannot read; `false` if
    /// some bundle could not be fetched. An app the message does not mention keeps running as it
    /// is (`leaving.rs`): only an explicit removal prunes.
    async fn apply_assignments(
        self: &Arc<Self>,
        message: Assignments,
        cancel: &CancellationToken,
    ) -> Result<bool> {
        let mut complete = true;
        let wanted: BTreeMap<String, Assignment> = message
            .apps
            .iter()
            .filter(|a| fate(&a.app, &message) == Fate::Run)
            .map(|a| (a.app.clone(), a.clone()))
            .collect();
        for (app, a) in &wanted {
            lock(&self.held).remove(app);
            lock(&self.unmentioned).remove(app);
            let orders = Orders::of(a);
            let current = lock(&self.running).get(app).map(|r| r.orders.clone());
            if current.as_ref() == Some(&orders) {
                continue;
            }
            let fetched = async {
                let bundle = self.bundle_for(a, &a.digest).await?;
                let preview = match a.preview_digest.as_str() {
                    "" => None,
                    d => Some(self.bundle_for(a, d).await?.objects),
                };
                Ok::<_, Error>((bundle, preview))
            };
            let (bundle, preview) = match fetched.await {
                Ok(b) => b,
                Err(e) => {
                    self.board.set(AppStatus {
                        app: app.clone(),
                        revision: a.revision.clone(),
                        digest: current.map(|o| o.digest).unwrap_or_default(),
                        sync: SyncStatus::OutOfSync.into(),
                        health: HealthStatus::Unknown.into(),
                        message: format!("fetching bundle {}: {e}", a.digest),
                        ..AppStatus::default()
                    });
                    complete = false;
                    continue;
                }
            };
            tracing::info!(app, digest = %a.digest, revision = %a.revision, manual = a.manual, sync_request = a.sync_request, "running new orders");
            self.start(bundle, preview, orders, cancel);
        }
        let known: Vec<String> = lock(&self.running)
            .keys()
            .chain(lock(&self.held).keys())
            .cloned()
            .collect();
        for (app, fate) in leaving(known.iter().map(String::as_str), &message) {
            match fate {
                Fate::Run => {}
                Fate::Prune => {
                    lock(&self.held).remove(&app);
                    lock(&self.unmentioned).remove(&app);
                    self.remove(&app).await;
                }
                Fate::Hold(reason) => self.hold(&app, &reason),
                Fate::Keep => {
                    if lock(&self.running).contains_key(&app)
                        && lock(&self.unmentioned).insert(app.clone())
                    {
                        tracing::warn!(
                            app,
                            "the hub neither assigns nor removes this app; it keeps running as it is (only an explicit removal prunes)"
                        );
                    }
                }
            }
        }
        Ok(complete)
    }

    /// Stops enforcing an app the hub cannot read, leaving every object of it as it is.
    fn hold(&self, app: &str, reason: &str) {
        let previous = lock(&self.running).remove(app);
        let digest = previous.as_ref().map(|r| r.orders.digest.clone());
        if let Some(running) = previous {
            running.cancel.cancel();
        }
        let newly = lock(&self.held)
            .insert(app.to_string(), reason.to_string())
            .is_none();
        if newly {
            tracing::error!(
                app,
                reason,
                "the hub cannot read this app: holding it (nothing applied, nothing pruned) until an operator fixes or deletes it"
            );
        }
        self.metrics
            .apps
            .set(i64::try_from(lock(&self.running).len()).unwrap_or(i64::MAX));
        self.board.set(AppStatus {
            app: app.to_string(),
            digest: digest.unwrap_or_default(),
            sync: SyncStatus::Unknown.into(),
            health: HealthStatus::Unknown.into(),
            message: format!("held: {reason}; its objects are left as they are"),
            ..AppStatus::default()
        });
    }

    /// The bundle `digest` for an assignment: from the cache when the digest matches, else
    /// fetched; a manual app's empty digest (never synced) is an empty bundle.
    async fn bundle_for(&self, a: &Assignment, digest: &str) -> Result<CachedBundle> {
        let spec = spec_of(a);
        let revision = a.revision.clone();
        if digest.is_empty() {
            return Ok(CachedBundle {
                spec,
                objects: Vec::new(),
                digest: String::new(),
                revision,
            });
        }
        if let Some(cache) = self.engine.cache()
            && let Some(cached) = cache.bundle(&a.app)?
            && cached.digest == digest
        {
            return Ok(CachedBundle { spec, ..cached });
        }
        let creds = self
            .identity
            .load()
            .await?
            .ok_or_else(|| Error::NeedsOperator("no identity to fetch bundles with".into()))?;
        let bytes = self.link.fetch_bundle(&creds, digest).await?;
        let objects = decode_bundle(digest, &bytes)?;
        Ok(CachedBundle {
            spec,
            objects,
            digest: digest.to_string(),
            revision,
        })
    }

    fn start(
        self: &Arc<Self>,
        bundle: CachedBundle,
        preview: Option<Vec<serde_json::Value>>,
        orders: Orders,
        parent: &CancellationToken,
    ) {
        let cancel = parent.child_token();
        let previous = lock(&self.running).insert(
            bundle.spec.name.clone(),
            Running {
                orders: orders.clone(),
                cancel: cancel.clone(),
            },
        );
        if let Some(previous) = previous {
            previous.cancel.cancel();
        }
        self.metrics
            .apps
            .set(i64::try_from(lock(&self.running).len()).unwrap_or(i64::MAX));
        let fleet = Arc::clone(self);
        self.tasks
            .spawn(async move { fleet.run_app(bundle, preview, orders, cancel).await });
    }

    async fn remove(&self, app: &str) {
        if let Some(running) = lock(&self.running).remove(app) {
            running.cancel.cancel();
        }
        // The cancelled task's pass stops first: a removal never races a sync.
        let pass_lock = self.pass_lock(app);
        let _pass = pass_lock.lock().await;
        self.metrics
            .apps
            .set(i64::try_from(lock(&self.running).len()).unwrap_or(i64::MAX));
        let spec = AppSpec {
            name: app.to_string(),
            namespace: "default".into(),
            prune: true,
            allow_empty: true,
            create_namespace: false,
            manual: false,
            self_heal: true,
        };
        match self.engine.reconcile(&spec, &[], |_| {}).await {
            Ok(report) => {
                tracing::info!(
                    app,
                    pruned = report.count(|o| matches!(o, Outcome::Pruned)),
                    "app removed"
                );
                // An object that could not be pruned stays in the inventory, so it is not lost.
                if report.failed() > 0 {
                    tracing::warn!(
                        app,
                        failed = report.failed(),
                        "some objects of the removed app could not be pruned; its inventory is kept"
                    );
                } else if let Err(e) = self.engine.forget(app).await {
                    tracing::warn!(app, error = %e, "forgetting the removed app's inventory");
                }
                self.board.set(AppStatus {
                    app: app.to_string(),
                    removed: true,
                    ..AppStatus::default()
                });
            }
            Err(e) => {
                tracing::warn!(app, error = %e, "removing app; will retry on the next assignment")
            }
        }
    }

    async fn run_app(
        self: Arc<Self>,
        bundle: CachedBundle,
        preview: Option<Vec<serde_json::Value>>,
        orders: Orders,
        cancel: CancellationToken,
    ) {
        let app = bundle.spec.clone();
        // For the commands its messages suggest. No name only before the cluster is known at
        // all (no `--cluster-name`, no stored identity): the hint then shows a placeholder.
        let cluster = self.engine.cluster_name().unwrap_or("CLUSTER").to_string();
        // Cached first: an agent killed mid-apply comes back to this bundle, even without a hub.
        if let Some(cache) = self.engine.cache()
            && !bundle.digest.is_empty()
            && let Err(e) = cache
                .save_bundle(&app, &bundle.objects, &bundle.digest, &bundle.revision)
                .await
        {
            tracing::warn!(app = %app.name, error = %e, "caching the bundle");
        }
        let drift = Arc::new(std::sync::atomic::AtomicU64::new(0));
        // Drift seen and not healed (manual, selfHeal off): compare again at once.
        let drifted = Arc::new(tokio::sync::Notify::new());
        // One of the app's objects changed and still matches: its health may have moved.
        let changed = Arc::new(tokio::sync::Notify::new());
        let status = |digest: &str,
                      sync: SyncStatus,
                      health: &Health,
                      failed: usize,
                      diff: &str,
                      hooks: &[HookRun]| {
            AppStatus {
                app: app.name.clone(),
                // The revision of what the cluster runs, when known (a manual app may run
                // an earlier bundle than the one assigned, or none).
                revision: if digest == bundle.digest {
                    bundle.revision.clone()
                } else {
                    String::new()
                },
                digest: digest.to_string(),
                sync: sync.into(),
                health: health.state.into(),
                message: health.message.clone(),
                drift_count: drift.load(std::sync::atomic::Ordering::Relaxed),
                failed_objects: u32::try_from(failed).unwrap_or(u32::MAX),
                diff: diff.to_string(),
                hooks: hooks.to_vec(),
                ..AppStatus::default()
            }
        };
        // Objects that could not be applied are retried with jittered exponential backoff, not
        // only at the periodic resync, so a fix made outside git (a namespace created by hand, a
        // CRD installed by another app) converges on its own; a permanent failure costs one
        // attempt every few minutes at most.
        let mut backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(120));
        let mut watch: Option<(CancellationToken, Vec<ObjRef>)> = None;
        let mut last_failures: Option<Vec<ObjRef>> = None;
        // The hooks of the last sync that ran any (they run once per revision).
        let mut hooks: Vec<HookRun> = Vec::new();
        let pass_lock = self.pass_lock(&app.name);
        loop {
            let pass_guard = tokio::select! {
                _ = cancel.cancelled() => return,
                guard = Arc::clone(&pass_lock).lock_owned() => guard,
            };
            // The common case (automated, healing) always applies: no inventory read to decide.
            let pass = if orders.always_applies() {
                Ok((Pass::Apply, bundle.digest.clone()))
            } else {
                self.engine.inventory(&app.name).await.map(|inv| {
                    let failures_left = last_failures.as_ref().is_some_and(|f| !f.is_empty());
                    let pass = pass_for(&orders, &inv.digest, inv.sync_request, failures_left);
                    (pass, inv.digest)
                })
            };
            let outcome = match pass {
                Ok((Pass::Apply, _)) => {
                    // A superseded pass stops where it is (its inventory already names everything
                    // it may have created), rather than finish an old bundle under the new one.
                    let applied = tokio::select! {
                        _ = cancel.cancelled() => return,
                        applied = self.apply_pass(&app, &bundle, &orders, &mut last_failures, |waiting| {
                            // A wave or hook may hold the pass for minutes: say on what meanwhile.
                            let h = Health {
                                state: HealthStatus::Progressing,
                                message: waiting.to_string(),
                            };
                            self.board.set(status(&bundle.digest, SyncStatus::OutOfSync, &h, 0, "", &hooks));
                        }) => applied,
                    };
                    // What the next sync would change: the revision git wants, when the
                    // rollout has not given it to this cluster yet (after a sync of the assigned
                    // bundle, that bundle itself would change nothing).
                    let next = match (&applied, preview.as_deref()) {
                        (Ok(_), Some(wanted)) => match self.engine.diff(&app, wanted).await {
                            Ok(d) => d.text,
                            Err(e) => format!("(the next revision could not be compared: {e})"),
                        },
                        _ => String::new(),
                    };
                    applied.map(|(objects, sync, failures, ran)| {
                        if !ran.is_empty() {
                            hooks = ran;
                        }
                        (objects, sync, failures, bundle.digest.clone(), next)
                    })
                }
                Ok((Pass::Compare, applied)) => self
                    .compare_pass(&app, &bundle, preview.as_deref())
                    .await
                    .map(|(objects, sync, diff)| (objects, sync, Vec::new(), applied, diff)),
                Err(e) => Err(e),
            };
            drop(pass_guard);
            let (objects, sync, failures, digest, diff) = match outcome {
                Ok(o) => o,
                Err(e) => {
                    let h = Health {
                        state: HealthStatus::Unknown,
                        message: format!("reconcile failed: {e}"),
                    };
                    self.board.refresh(status(
                        &bundle.digest,
                        SyncStatus::Unknown,
                        &h,
                        0,
                        "",
                        &hooks,
                    ));
                    let delay = backoff.next_delay(random_fraction());
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            // The drift watch follows what is applied: a kind that was not served before (its CRD
            // arrived) is watched from the pass that applied it.
            if watch.as_ref().is_none_or(|(_, f)| *f != failures) {
                if let Some((old, _)) = watch.take() {
                    old.cancel();
                }
                let token = cancel.child_token();
                self.spawn_drift_watch(
                    &app,
                    &bundle,
                    token.clone(),
                    Arc::clone(&drift),
                    Arc::clone(&drifted),
                    Arc::clone(&changed),
                );
                watch = Some((token, failures.clone()));
            }
            let (mut h, _) = self.engine.health(&app.name, &objects).await;
            with_difference(&mut h, sync, &app, &cluster);
            self.board
                .refresh(status(&digest, sync, &h, failures.len(), &diff, &hooks));
            let next = if failures.is_empty() {
                backoff.reset();
                self.intervals.resync
            } else {
                backoff.next_delay(random_fraction())
            };
            let attempt = tokio::time::sleep(next);
            tokio::pin!(attempt);
            let mut ticker = tokio::time::interval(Duration::from_millis(500));
            ticker.tick().await;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = &mut attempt => break,
                    _ = drifted.notified() => break,
                    // An object's status moved: health is reported now, not on the next tick.
                    _ = changed.notified() => {}
                    _ = ticker.tick() => {}
                }
                let (mut h, _) = self.engine.health(&app.name, &objects).await;
                let settled = h.state != HealthStatus::Progressing;
                with_difference(&mut h, sync, &app, &cluster);
                self.board
                    .set(status(&digest, sync, &h, failures.len(), &diff, &hooks));
                if settled {
                    ticker.reset_after(self.intervals.health);
                }
            }
        }
    }

    /// A sync: applies the bundle; returns what health is judged over, the sync state and the
    /// objects that failed. A completed operator request is recorded, so it is carried out once.
    async fn apply_pass(
        &self,
        app: &AppSpec,
        bundle: &CachedBundle,
        orders: &Orders,
        last_failures: &mut Option<Vec<ObjRef>>,
        mut waiting: impl FnMut(&str) + Send,
    ) -> Result<(
        Vec<(ObjRef, Option<String>)>,
        SyncStatus,
        Vec<ObjRef>,
        Vec<HookRun>,
    )> {
        let result = self
            .engine
            .reconcile(app, &bundle.objects, |step| {
                if let Progress::Waiting(what) = step {
                    waiting(what);
                }
            })
            .await;
        self.metrics
            .reconciled(result.as_ref().is_ok_and(|r| r.failed() == 0));
        let report = result?;
        let objects = report.bundle_objects();
        let failures: Vec<ObjRef> = objects
            .iter()
            .filter(|(_, e)| e.is_some())
            .map(|(r, _)| r.clone())
            .collect();
        if last_failures.as_ref() != Some(&failures) {
            // Logged once per change, not on every attempt.
            match objects.iter().find_map(|(r, e)| e.as_ref().map(|e| (r, e))) {
                Some((r, e)) => {
                    tracing::warn!(app = %app.name, failed = failures.len(), first = %r, error = %e, "objects could not be applied; retrying with backoff")
                }
                None => {
                    tracing::info!(app = %app.name, objects = objects.len(), "every object applied")
                }
            }
        }
        *last_failures = Some(failures.clone());
        if failures.is_empty() && orders.sync_request > 0 {
            self.engine
                .mark_sync_request(&app.name, orders.sync_request)
                .await?;
        }
        let sync = report.sync();
        Ok((objects, sync, failures, report.hooks))
    }

    /// A comparison: what a sync of the preview (else the assigned bundle) would change, nothing
    /// written. Health is judged over what the cluster runs (the assigned bundle; the preview when
    /// nothing was ever applied).
    async fn compare_pass(
        &self,
        app: &AppSpec,
        bundle: &CachedBundle,
        preview: Option<&[serde_json::Value]>,
    ) -> Result<(Vec<(ObjRef, Option<String>)>, SyncStatus, String)> {
        let target = preview.unwrap_or(&bundle.objects);
        let difference = self.engine.diff(app, target).await?;
        // The diff's own refs are the running bundle's unless a preview is compared.
        let runs = match preview {
            Some(_) if !bundle.digest.is_empty() => self.engine.refs(app, &bundle.objects).await,
            _ => difference.objects.clone(),
        };
        let sync = if difference.differing == 0 {
            SyncStatus::Synced
        } else {
            SyncStatus::OutOfSync
        };
        let objects = runs.into_iter().map(|r| (r, None)).collect();
        Ok((objects, sync, difference.text))
    }

    /// Heals drift of `bundle` until `cancel`: its own task, so a burst of watch events can never
    /// starve the health reports.
    fn spawn_drift_watch(
        self: &Arc<Self>,
        app: &AppSpec,
        bundle: &CachedBundle,
        cancel: CancellationToken,
        drift: Arc<std::sync::atomic::AtomicU64>,
        drifted: Arc<tokio::sync::Notify>,
        changed: Arc<tokio::sync::Notify>,
    ) {
        let fleet = Arc::clone(self);
        let heals = self.metrics.drift_heals.clone();
        let (app, objects) = (app.clone(), bundle.objects.clone());
        self.tasks.spawn(async move {
            let result = fleet
                .engine
                .keep_in_sync(&app, &objects, None, cancel, move |seen| match seen {
                    Seen::Drift {
                        object,
                        count,
                        healed,
                    } => {
                        drift.store(count, std::sync::atomic::Ordering::Relaxed);
                        if healed {
                            tracing::info!(%object, drift = count, "healed drift");
                            heals.inc();
                        } else {
                            tracing::info!(%object, drift = count, "drift seen; not healed (manual sync or selfHeal off)");
                            drifted.notify_one();
                        }
                    }
                    Seen::Changed(_) => changed.notify_one(),
                })
                .await;
            if let Err(e) = result {
                tracing::warn!(app = %app.name, error = %e, "drift watch ended; the next full pass restarts it");
            }
        });
    }
}
