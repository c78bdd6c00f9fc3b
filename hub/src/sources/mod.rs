//! Keeps apps rendered: fetches their git sources (polled with jitter, or kicked by a webhook or an
//! app change), renders each targeted cluster's variant once per distinct variant, stores bundles,
//! and records assignments and revision history. A failed fetch or render keeps the last good
//! assignments and surfaces the error on the app.

pub mod credentials;
pub mod git;
pub(crate) mod kustomize_paths;
pub mod render;
pub(crate) mod untrusted;
pub mod webhook;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_bundle::customize::{self, ClusterFacts};
use tokio::sync::{Notify, Semaphore};

use crate::apps::SourceType;
use crate::db::appstore::{AppRecord, HISTORY_LIMIT, HistoryEntry};
use crate::rollout::Assigned;
use crate::{Error, Hub, Result, now_unix};
use git::TreeLimits;
use render::Base;

/// Settings of the source machinery.
#[derive(Debug, Clone)]
pub struct SourceSettings {
    /// Where repository caches live.
    pub cache_root: PathBuf,
    pub kustomize_bin: String,
    pub helm_bin: String,
    pub poll_interval: Duration,
    /// HMAC secret for webhooks; webhooks are refused without one.
    pub webhook_secret: Option<Vec<u8>>,
    /// A repository path holding App documents: the fleet's own definition, GitOps-managed.
    pub fleet: Option<FleetRepo>,
    /// Credentials for private repositories, by URL prefix.
    pub credentials: crate::sources::credentials::RepoCredentials,
}

/// Where the fleet's App documents live.
#[derive(Debug, Clone)]
pub struct FleetRepo {
    pub url: String,
    pub reference: String,
    pub path: String,
}

/// (revision, app generation, base render) of an app.
type CachedBase = (String, u64, Arc<Base>);

/// Runtime state of the source machinery.
pub struct SyncState {
    kick: Notify,
    pending: Mutex<BTreeSet<String>>,
    recompute: Mutex<bool>,
    in_flight: Mutex<HashSet<String>>,
    repo_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// One render of an app at a time: a recompute and a poll of the same app never overlap.
    app_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    fetch_slots: Semaphore,
    /// app → (revision, generation, base render): one render per revision serves every cluster.
    bases: Mutex<HashMap<String, CachedBase>>,
    /// app → what its last good render was made of: a poll that finds the same commit, document
    /// and clusters renders nothing (a render reads every cluster; polls come twice a second).
    rendered: Mutex<HashMap<String, RenderInputs>>,
    /// app → the variants its render at one (commit, generation) made: a re-render for a changed
    /// fleet (a cluster joined, a label moved) renders only variants not seen yet.
    variants: Mutex<HashMap<String, KnownVariants>>,
}

/// Variant key → bundle digest of one app at one commit and document (the document itself, not
/// its generation: an app deleted and created again starts its generations over).
#[derive(Debug)]
struct KnownVariants {
    commit: String,
    doc: crate::apps::AppDocument,
    digests: HashMap<String, String>,
}

/// What a render's outcome depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RenderInputs {
    commit: String,
    generation: u64,
    clusters_epoch: u64,
}

impl SyncState {
    pub fn new(max_concurrent_fetches: usize) -> Self {
        Self {
            kick: Notify::new(),
            pending: Mutex::new(BTreeSet::new()),
            recompute: Mutex::new(false),
            in_flight: Mutex::new(HashSet::new()),
            repo_locks: Mutex::new(HashMap::new()),
            app_locks: Mutex::new(HashMap::new()),
            fetch_slots: Semaphore::new(max_concurrent_fetches.max(1)),
            bases: Mutex::new(HashMap::new()),
            rendered: Mutex::new(HashMap::new()),
            variants: Mutex::new(HashMap::new()),
        }
    }

    /// Asks for a fetch and re-render of `url` now.
    pub fn kick_repo(&self, url: &str) {
        lock(&self.pending).insert(url.to_string());
        self.kick.notify_one();
    }

    /// Asks for every app to be re-rendered without fetching (clusters changed).
    pub fn kick_recompute(&self) {
        *lock(&self.recompute) = true;
        self.kick.notify_one();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each critical section is a single insert/remove/lookup, so a poisoned lock's data is sound.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("blocking task failed: {e}")))?
}

/// Fetches `url` into its cache: one fetch per repository at a time, a bounded number overall.
pub async fn fetch_repo(hub: &Arc<Hub>, url: &str) -> Result<()> {
    let repo_lock = Arc::clone(
        lock(&hub.sync.repo_locks)
            .entry(url.to_string())
            .or_default(),
    );
    let _one_per_repo = repo_lock.lock().await;
    let _slot = hub
        .sync
        .fetch_slots
        .acquire()
        .await
        .map_err(|_| Error::Internal("fetch slots closed".into()))?;
    let root = hub.source_settings.cache_root.clone();
    let url_owned = url.to_string();
    let started = Instant::now();
    let credential = hub.source_settings.credentials.for_url(url).cloned();
    blocking(move || git::fetch(&root, &url_owned, credential.as_ref())).await?;
    tracing::debug!(url, elapsed = ?started.elapsed(), "fetched");
    Ok(())
}

fn facts(hub: &Hub) -> Result<Vec<ClusterFacts>> {
    Ok(hub
        .store
        .clusters()?
        .iter()
        .map(|c| ClusterFacts {
            name: c.name.clone(),
            labels: c.labels.clone(),
        })
        .collect())
}

/// Renders `record` at its source's current revision: (revision, cluster → digest).
/// The commit an app renders: its pin, else what its ref points at in the cache.
async fn commit_of(hub: &Arc<Hub>, record: &AppRecord) -> Result<String> {
    let spec = &record.doc.spec;
    let root = hub.source_settings.cache_root.clone();
    let (url, reference) = (spec.source.repo_url.clone(), spec.source.reference.clone());
    match record.status.pinned.clone() {
        Some(commit) => Ok(commit),
        None => blocking(move || git::resolve(&root, &url, &reference)).await,
    }
}

async fn render_app(
    hub: &Arc<Hub>,
    record: &AppRecord,
    commit: String,
) -> Result<(String, BTreeMap<String, String>)> {
    let spec = &record.doc.spec;

    // A path that names cluster facts (`deploy/overlays/${cluster.labels.env}`) is resolved per
    // cluster; a plain one is rendered once, before any cluster, so its errors are the app's.
    let templated = !customize::placeholders(&spec.source.path).is_empty();
    let shared = if templated {
        None
    } else {
        Some(base_for(hub, record, &commit, &spec.source.path).await?)
    };
    // Bundles are content-addressed and never collected: a digest known for a variant key
    // at this commit and document stays valid. Nothing known (first render, another commit or
    // document, or a render that stopped early and put nothing back) only means every variant
    // is rendered, as before the cache.
    let mut variants: HashMap<String, String> = lock(&hub.sync.variants)
        .remove(&record.doc.metadata.name)
        .filter(|k| k.commit == commit && k.doc == record.doc)
        .map(|k| k.digests)
        .unwrap_or_default();
    let mut assignments = BTreeMap::new();
    // (cluster, why) of every cluster whose variant failed: reported once for the app when it
    // does not depend on the cluster, else naming the clusters.
    let mut failures: Vec<(String, String)> = Vec::new();
    let mut targeted = 0usize;
    for cluster in facts(hub)? {
        if !record.doc.targets(&cluster.name, &cluster.labels) {
            continue;
        }
        targeted += 1;
        let base = match &shared {
            Some(base) => Arc::clone(base),
            None => match cluster_base(hub, record, &commit, &cluster).await {
                Ok(base) => base,
                Err(e) => {
                    failures.push((cluster.name.clone(), render::reason(e)));
                    continue;
                }
            },
        };
        // A Helm chart is rendered per distinct set of values: the cluster's merged values are
        // part of the key, so clusters with equal values still share one render.
        let helm_values = match &base.chart {
            Some(_) => {
                let source_values = spec
                    .source
                    .helm
                    .as_ref()
                    .map_or(serde_json::Value::Null, |h| h.values.clone());
                match customize::helm_values(&source_values, &cluster, &spec.customizations) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        failures.push((cluster.name.clone(), e.to_string()));
                        continue;
                    }
                }
            }
            None => None,
        };
        let key = format!(
            "{}\0{}\0{}",
            base.path,
            helm_values
                .as_ref()
                .map(|v| v.to_string())
                .unwrap_or_default(),
            customize::variant_key(&base.used, &cluster, &spec.customizations)
        );
        let digest = match variants.get(&key) {
            Some(d) => d.clone(),
            None => {
                let base = match (&base.chart, &helm_values) {
                    (Some(chart), Some(values)) => {
                        match helm_base(hub, record, &base, chart, values).await {
                            Ok(b) => b,
                            Err(e) => {
                                failures.push((cluster.name.clone(), render::reason(e)));
                                continue;
                            }
                        }
                    }
                    _ => Arc::clone(&base),
                };
                let (b, c, custom, allow_empty) = (
                    Arc::clone(&base),
                    cluster.clone(),
                    spec.customizations.clone(),
                    spec.sync_policy.allow_empty,
                );
                let rendered = crate::sources::untrusted::run(
                    &format!("rendering for cluster {}", cluster.name),
                    crate::sources::untrusted::RENDER_BUDGET,
                    move || {
                        let objects = render::variant(&b, &c, &custom, allow_empty)?;
                        render::bounded_bytes(&objects)
                    },
                )
                .await;
                let bytes = match rendered {
                    Ok(bytes) => bytes,
                    Err(e) => {
                        failures.push((cluster.name.clone(), render::reason(e)));
                        continue;
                    }
                };
                let digest = flotilla_bundle::digest_bytes(&bytes);
                hub.apps.put_bundle(&digest, &bytes)?;
                hub.metrics.variant_renders.inc();
                variants.insert(key, digest.clone());
                digest
            }
        };
        assignments.insert(cluster.name, digest);
    }
    lock(&hub.sync.variants).insert(
        record.doc.metadata.name.clone(),
        KnownVariants {
            commit: commit.clone(),
            doc: record.doc.clone(),
            digests: variants,
        },
    );
    if let Some(message) = render::summarize_failures(&failures, targeted) {
        return Err(Error::Render(message));
    }
    Ok((commit, assignments))
}

/// Runs the cluster-independent checks of a base on the blocking pool (`what` names it in errors).
async fn check_base(base: &Arc<Base>, what: &str) -> Result<()> {
    let checked = Arc::clone(base);
    crate::sources::untrusted::run(what, crate::sources::untrusted::PARSE_BUDGET, move || {
        render::check_base(&checked)
    })
    .await
}

/// The base of `record` at `commit` for source path `path` (cached per app, path and revision).
async fn base_for(
    hub: &Arc<Hub>,
    record: &AppRecord,
    commit: &str,
    path: &str,
) -> Result<Arc<Base>> {
    let spec = &record.doc.spec;
    let cache_key = format!("{}\0{path}", record.doc.metadata.name);
    let cached = lock(&hub.sync.bases)
        .get(&cache_key)
        .filter(|(rev, generation, _)| *rev == commit && *generation == record.generation)
        .map(|(_, _, base)| Arc::clone(base));
    if let Some(base) = cached {
        return Ok(base);
    }
    let root = hub.source_settings.cache_root.clone();
    // Kustomize overlays may refer to bases elsewhere in the repository: they get the whole tree
    // (still read with limits and symlink containment); plain sources only their path.
    let read_path = match spec.source.kind {
        SourceType::Plain | SourceType::Helm => path.to_string(),
        SourceType::Kustomize => String::new(),
    };
    let (url, c) = (spec.source.repo_url.clone(), commit.to_string());
    let files =
        blocking(move || git::read_tree(&root, &url, &c, &read_path, TreeLimits::default()))
            .await?;
    let scratch =
        tempfile::tempdir().map_err(|e| Error::Internal(format!("scratch directory: {e}")))?;
    let base = Arc::new(
        render::base(
            spec.source.kind,
            files,
            path,
            &hub.source_settings.kustomize_bin,
            scratch.path(),
        )
        .await?,
    );
    // What does not depend on a cluster is checked once, whether or not any cluster is targeted
    // yet: an app never looks fine only because nothing rendered it.
    check_base(&base, "checking the manifests").await?;
    lock(&hub.sync.bases).insert(
        cache_key,
        (commit.to_string(), record.generation, Arc::clone(&base)),
    );
    Ok(base)
}

/// The rendered chart for one set of values, as a base of one text (not substituted: `${…}` is
/// Flotilla's only in values).
async fn helm_base(
    hub: &Arc<Hub>,
    record: &AppRecord,
    base: &Base,
    chart: &Arc<render::Files>,
    values: &serde_json::Value,
) -> Result<Arc<Base>> {
    let spec = &record.doc.spec;
    let helm = spec.source.helm.clone().unwrap_or_default();
    let release = helm
        .release_name
        .clone()
        .unwrap_or_else(|| record.doc.metadata.name.clone());
    let scratch =
        tempfile::tempdir().map_err(|e| Error::Internal(format!("scratch directory: {e}")))?;
    let text = render::helm(
        chart,
        &base.path,
        &render::HelmRender {
            release: &release,
            namespace: &spec.namespace,
            value_files: &helm.value_files,
            values,
            skip_crds: helm.skip_crds,
        },
        &hub.source_settings.helm_bin,
        scratch.path(),
    )
    .await?;
    let rendered = Arc::new(Base {
        path: base.path.clone(),
        texts: vec![("helm template".to_string(), text)],
        used: BTreeSet::new(),
        chart: Some(Arc::clone(chart)),
    });
    check_base(&rendered, "checking the chart's output").await?;
    Ok(rendered)
}

/// The base for one cluster of an app whose source path names cluster facts.
async fn cluster_base(
    hub: &Arc<Hub>,
    record: &AppRecord,
    commit: &str,
    cluster: &ClusterFacts,
) -> Result<Arc<Base>> {
    let spec = &record.doc.spec;
    let vars = customize::variables(cluster, &spec.customizations);
    let path = customize::substitute("spec.source.path", &spec.source.path, &vars)
        .map_err(|e| Error::Render(e.to_string()))?;
    crate::apps::check_path(&path)?;
    base_for(hub, record, commit, &path)
        .await
        .map_err(|e| match e {
            Error::Source(m) => Error::Render(m),
            other => other,
        })
}

/// Renders one app and records the outcome on it.
pub async fn sync_app(hub: &Arc<Hub>, name: &str) -> Result<()> {
    let app_lock = Arc::clone(
        lock(&hub.sync.app_locks)
            .entry(name.to_string())
            .or_default(),
    );
    let _one_render_per_app = app_lock.lock().await;
    // Shared, not copied: most polls find nothing to do, and a copy is O(clusters).
    let Some(record) = hub.apps.get_shared(name)? else {
        // A deleted app leaves nothing behind in the source machinery's memory.
        lock(&hub.sync.app_locks).remove(name);
        lock(&hub.sync.variants).remove(name);
        lock(&hub.sync.rendered).remove(name);
        return Ok(());
    };
    // Read before the render reads the clusters: a change meanwhile renders again.
    let clusters_epoch = hub.store.clusters_epoch();
    let outcome = match commit_of(hub, &record).await {
        Ok(commit) => {
            let inputs = RenderInputs {
                commit: commit.clone(),
                generation: record.generation,
                clusters_epoch,
            };
            let settled = record.status.last_error.is_none()
                && record.status.revision.as_deref() == Some(commit.as_str())
                && lock(&hub.sync.rendered).get(name) == Some(&inputs);
            if settled {
                return Ok(());
            }
            render_app(hub, &record, commit).await.map(|o| (o, inputs))
        }
        Err(e) => Err(e),
    };
    let generation = record.generation;
    let now = now_unix();
    match outcome {
        Ok(((revision, assignments), inputs)) => {
            hub.apps
                .update_status(name, |r| {
                    if r.generation != generation {
                        return; // the document changed meanwhile; its own sync follows
                    }
                    let s = &mut r.status;
                    // History is of revisions: a re-render of the newest one (a cluster joined,
                    // a label changed) updates its entry rather than pushing rollback targets out.
                    match s.history.last_mut() {
                        Some(h) if h.revision == revision => {
                            let moved = s.target.len() != assignments.len()
                                || assignments.iter().any(|(c, d)| s.target.get(c).map(|t| &t.digest) != Some(d));
                            if moved {
                                h.bundles = crate::db::appstore::variants(&assignments);
                                h.rolled_out = false;
                                tracing::info!(app = name, %revision, clusters = assignments.len(), "app re-rendered at the same revision");
                            }
                        }
                        _ => {
                            s.history.push(HistoryEntry::of_render(&revision, now, &assignments));
                            let excess = s.history.len().saturating_sub(HISTORY_LIMIT);
                            s.history.drain(..excess);
                            tracing::info!(app = name, %revision, clusters = assignments.len(), "app rendered");
                        }
                    }
                    // The rollout controller moves clusters from their assignments to this target.
                    let target: BTreeMap<String, Assigned> = assignments
                        .iter()
                        .map(|(cluster, digest)| {
                            let to = Assigned { digest: digest.clone(), revision: revision.clone() };
                            (cluster.clone(), to)
                        })
                        .collect();
                    s.target = target;
                    s.revision = Some(revision.clone());
                    s.observed_generation = generation;
                    s.last_error = None;
                    s.last_error_at = None;
                })
                .await?;
            lock(&hub.sync.rendered).insert(name.to_string(), inputs);
            hub.metrics
                .renders
                .get_or_create(&crate::edge::metrics::ResultLabel {
                    result: "ok".into(),
                })
                .inc();
        }
        Err(err) => {
            let message = err.to_string();
            // Once per change of the error, not on every poll of an unchanged broken revision.
            if record.status.last_error.as_deref() == Some(message.as_str()) {
                tracing::debug!(app = name, error = %err, "app render still failing");
            } else {
                tracing::warn!(app = name, error = %err, "app render failed; keeping the last good bundles");
            }
            hub.metrics
                .renders
                .get_or_create(&crate::edge::metrics::ResultLabel {
                    result: "error".into(),
                })
                .inc();
            hub.apps
                .update_status(name, |r| {
                    r.status.last_error = Some(message.clone());
                    r.status.last_error_at = Some(now);
                })
                .await?;
        }
    }
    Ok(())
}

/// Reads the App documents of the fleet repository at its current revision and makes the stored
/// fleet apps match: added, changed, removed by commits. A broken commit changes nothing.
async fn sync_fleet(hub: &Arc<Hub>, fleet: &FleetRepo) -> Result<()> {
    let root = hub.source_settings.cache_root.clone();
    let (url, reference, path) = (
        fleet.url.clone(),
        fleet.reference.clone(),
        fleet.path.clone(),
    );
    let files = blocking(move || {
        let commit = git::resolve(&root, &url, &reference)?;
        git::read_tree(&root, &url, &commit, &path, TreeLimits::default())
    })
    .await?;
    let mut docs = Vec::new();
    for (file, data) in files {
        if !(file.ends_with(".yaml") || file.ends_with(".yml")) {
            continue;
        }
        let text = String::from_utf8(data)
            .map_err(|_| Error::Render(format!("fleet {file}: not UTF-8")))?;
        let what = format!("fleet {file}");
        let parsed = crate::sources::untrusted::run(
            &what,
            crate::sources::untrusted::PARSE_BUDGET,
            move || crate::apps::AppDocument::parse_all(&text),
        )
        .await
        .map_err(|e| Error::Render(format!("fleet {file}: {}", render::reason(e))))?;
        docs.extend(parsed);
    }
    let catalog = hub.apps.list()?;
    let existing = &catalog.apps;
    let mut wanted = BTreeSet::new();
    for doc in docs {
        let name = doc.metadata.name.clone();
        // Its origin cannot be read: it might be hand-applied. An operator fixes or deletes it.
        if catalog.is_unreadable(&name) {
            tracing::warn!(app = %name, "the fleet repository defines an app whose record is unreadable; leaving it to an operator (`flotilla app apply` or `app delete`)");
            wanted.insert(name);
            continue;
        }
        if existing
            .iter()
            .any(|a| a.doc.metadata.name == name && a.origin != crate::apps::Origin::Fleet)
        {
            tracing::warn!(app = %name, "the fleet repository defines an app that was applied by hand; keeping the hand-applied one");
            continue;
        }
        let url = doc.spec.source.repo_url.clone();
        let before = existing
            .iter()
            .find(|a| a.doc.metadata.name == name)
            .map(|a| a.generation);
        let record = hub
            .apps
            .put_document(doc, crate::apps::Origin::Fleet, |r| {
                (before != Some(r.generation)).then(|| {
                    crate::db::audit::Record::new(
                        FLEET_ACTOR,
                        "app.apply",
                        format!("app/{}", r.doc.metadata.name),
                        format!("generation {} from the fleet repository", r.generation),
                    )
                })
            })
            .await?;
        if before != Some(record.generation) {
            tracing::info!(app = %name, "fleet app added or changed");
            hub.sync.kick_repo(&url);
        }
        wanted.insert(name);
    }
    for gone in existing.iter().filter(|a| {
        a.origin == crate::apps::Origin::Fleet && !wanted.contains(&a.doc.metadata.name)
    }) {
        tracing::info!(app = %gone.doc.metadata.name, "fleet app removed");
        let audit = crate::db::audit::Record::new(
            FLEET_ACTOR,
            "app.delete",
            format!("app/{}", gone.doc.metadata.name),
            "removed from the fleet repository",
        );
        hub.apps
            .delete(&gone.doc.metadata.name, Some(&audit))
            .await?;
    }
    Ok(())
}

/// Who changes apps defined in the fleet repository, in the audit log.
const FLEET_ACTOR: &str = "fleet-repository";

/// Fetches a repository and re-renders every app that uses it.
pub async fn sync_repo(hub: &Arc<Hub>, url: &str) -> Result<()> {
    let users: Vec<String> = hub
        .apps
        .list()?
        .apps
        .into_iter()
        .filter(|r| r.doc.spec.source.repo_url == url)
        .map(|r| r.doc.metadata.name.clone())
        .collect();
    let fleet = hub.source_settings.fleet.clone().filter(|f| f.url == url);
    if let Err(err) = fetch_repo(hub, url).await {
        tracing::warn!(url, error = %err, "fetch failed");
        let message = err.to_string();
        for name in &users {
            hub.apps
                .update_status(name, |r| {
                    r.status.last_error = Some(message.clone());
                    r.status.last_error_at = Some(now_unix());
                })
                .await?;
        }
        return Ok(());
    }
    if let Some(fleet) = &fleet
        && let Err(err) = sync_fleet(hub, fleet).await
    {
        tracing::warn!(url, error = %err, "fleet repository not applied; the fleet apps stay as they were");
    }
    for name in users {
        sync_app(hub, &name).await?;
    }
    Ok(())
}

fn jittered(interval: Duration) -> Duration {
    // A failing RNG only costs the jitter here: no secret is made of it.
    let r = u32::from_le_bytes(crate::random_bytes::<4>().unwrap_or([0x80; 4]));
    let fraction = 0.9 + 0.2 * (f64::from(r) / f64::from(u32::MAX));
    interval.mul_f64(fraction)
}

/// The poll loop: every repository is fetched about once per poll interval (±10%), at once when
/// kicked; recomputes run when clusters change. Returns at shutdown.
pub async fn run(hub: Arc<Hub>) {
    let mut next_due: HashMap<String, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = hub.shutdown.cancelled() => return,
            _ = hub.sync.kick.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let urls: BTreeSet<String> = match hub.apps.list() {
            Ok(catalog) => catalog
                .apps
                .into_iter()
                .map(|r| r.doc.spec.source.repo_url.clone())
                .chain(hub.source_settings.fleet.iter().map(|f| f.url.clone()))
                .collect(),
            Err(e) => {
                hub.metrics.store_read_failed("sources");
                tracing::error!(error = %e, "listing apps");
                continue;
            }
        };
        let kicked = std::mem::take(&mut *lock(&hub.sync.pending));
        let now = Instant::now();
        for url in urls {
            let due = next_due.get(&url).is_none_or(|t| now >= *t);
            if !(due || kicked.contains(&url)) || !lock(&hub.sync.in_flight).insert(url.clone()) {
                continue;
            }
            next_due.insert(
                url.clone(),
                now + jittered(hub.source_settings.poll_interval),
            );
            let hub2 = Arc::clone(&hub);
            hub.tasks.spawn(async move {
                if let Err(e) = sync_repo(&hub2, &url).await {
                    tracing::error!(url, error = %e, "sync failed");
                }
                lock(&hub2.sync.in_flight).remove(&url);
            });
        }
        if std::mem::take(&mut *lock(&hub.sync.recompute)) {
            let hub2 = Arc::clone(&hub);
            hub.tasks.spawn(async move {
                let names: Vec<String> = match hub2.apps.list() {
                    Ok(catalog) => catalog
                        .apps
                        .into_iter()
                        .map(|r| r.doc.metadata.name.clone())
                        .collect(),
                    Err(e) => {
                        // Asked again: the next loop turn retries the whole recompute.
                        hub2.metrics.store_read_failed("recompute");
                        tracing::error!(error = %e, "listing apps to recompute; retrying");
                        hub2.sync.kick_recompute();
                        return;
                    }
                };
                for name in names {
                    if let Err(e) = sync_app(&hub2, &name).await {
                        tracing::error!(app = name, error = %e, "recompute failed");
                    }
                }
            });
        }
    }
}
