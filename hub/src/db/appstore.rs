//! Durable app state in sled: app documents with their status and revision history, rendered
//! bundles stored once per digest (compressed), and tombstones of deleted apps. A record that does
//! not decode is never skipped silently: reads return it as an [`UnreadableApp`], so callers hold
//! that app instead of treating it as absent (absent means "prune it" to an agent).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use sled::Transactional;

use crate::apps::{AppDocument, Origin};
use crate::db::audit::Record;
use crate::fleet::wake::{Touched, Wakeups};
use crate::rollout::{Assigned, ClusterRollout, Rollout};
use crate::{Error, Result};

/// How many revisions an app's history keeps.
pub const HISTORY_LIMIT: usize = 50;

/// One rendered revision of an app. It names the bundles the render made (its variants), not
/// which cluster got which: that grows with the fleet, and the current render's per-cluster
/// targets are kept once, in the app's cluster slots.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "StoredHistoryEntry")]
pub struct HistoryEntry {
    pub revision: String,
    pub at: i64,
    /// Bundle digest → how many clusters the render gave it.
    pub bundles: BTreeMap<String, u32>,
    /// A rollout of this revision succeeded: it is a stable revision to roll back to.
    pub rolled_out: bool,
}

impl HistoryEntry {
    /// The entry of a render that gave each cluster (key) a bundle (value).
    pub fn of_render(revision: &str, at: i64, digests: &BTreeMap<String, String>) -> Self {
        Self {
            revision: revision.to_string(),
            at,
            bundles: variants(digests),
            rolled_out: false,
        }
    }
}

/// Digest → clusters, from cluster → digest.
pub fn variants(digests: &BTreeMap<String, String>) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    for digest in digests.values() {
        *out.entry(digest.clone()).or_insert(0) += 1;
    }
    out
}

/// A history entry as any release wrote it: up to 2026-12 each held cluster → digest
/// (`digests`); it reads as its variants.
#[derive(Deserialize)]
struct StoredHistoryEntry {
    revision: String,
    at: i64,
    #[serde(default)]
    bundles: BTreeMap<String, u32>,
    #[serde(default)]
    digests: BTreeMap<String, String>,
    #[serde(default)]
    rolled_out: bool,
}

impl From<StoredHistoryEntry> for HistoryEntry {
    fn from(e: StoredHistoryEntry) -> Self {
        let bundles = if e.bundles.is_empty() {
            variants(&e.digests)
        } else {
            e.bundles
        };
        Self {
            revision: e.revision,
            at: e.at,
            bundles,
            rolled_out: e.rolled_out,
        }
    }
}

/// What the hub knows about an app's rendering.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AppStatus {
    /// The commit the current assignments were rendered from.
    pub revision: Option<String>,
    /// Bumped by every change of the document; the renders of older generations are stale.
    pub observed_generation: u64,
    pub last_error: Option<String>,
    pub last_error_at: Option<i64>,
    /// Cluster → what git wants it to run (the render of `revision`).
    #[serde(default)]
    pub target: BTreeMap<String, Assigned>,
    /// Cluster → what it is told to run now: the target once the rollout reached it.
    pub assignments: BTreeMap<String, Assigned>,
    pub history: Vec<HistoryEntry>,
    /// The latest rollout (active or finished).
    #[serde(default)]
    pub rollout: Option<Rollout>,
    #[serde(default)]
    pub next_rollout_id: u64,
    /// The revision of the last rollout that succeeded.
    #[serde(default)]
    pub stable_revision: Option<String>,
    /// Set by `flotilla app rollback`: render this commit instead of following the ref.
    #[serde(default)]
    pub pinned: Option<String>,
    /// Cluster → the operator's latest sync request (`flotilla app sync`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sync_requests: BTreeMap<String, SyncRequest>,
    #[serde(default)]
    pub next_sync_request: u64,
}

/// An operator's request that a cluster apply one bundle of the app once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncRequest {
    /// Unique per app, increasing: the agent carries out each id once.
    pub id: u64,
    /// The bundle the request is for (git's render for the cluster when it was asked).
    pub digest: String,
}

/// What an app holds for one cluster, stored under its own key (`<app>/<cluster>` in the
/// `app_clusters` tree): a change that concerns one cluster writes one small record, and the
/// app's own record stays the size of its document and history, whatever the fleet's size.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Slot {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target: Option<Assigned>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    assigned: Option<Assigned>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sync_request: Option<SyncRequest>,
    /// The cluster's part in the app's latest rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rollout: Option<ClusterRollout>,
}

/// A [`Slot`] borrowed from a record: for comparing and writing without copying.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
struct SlotRef<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<&'a Assigned>,
    #[serde(skip_serializing_if = "Option::is_none")]
    assigned: Option<&'a Assigned>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sync_request: Option<&'a SyncRequest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rollout: Option<&'a ClusterRollout>,
}

impl SlotRef<'_> {
    /// What of a slot `reports::orders_for` puts in the cluster's orders.
    fn orders(&self) -> (Option<&Assigned>, Option<&Assigned>, Option<&SyncRequest>) {
        (self.target, self.assigned, self.sync_request)
    }
}

/// Every cluster slot of a record. Pure.
fn slots_of(record: &AppRecord) -> BTreeMap<&str, SlotRef<'_>> {
    let s = &record.status;
    let mut out: BTreeMap<&str, SlotRef<'_>> = BTreeMap::new();
    for (c, a) in &s.target {
        out.entry(c).or_default().target = Some(a);
    }
    for (c, a) in &s.assignments {
        out.entry(c).or_default().assigned = Some(a);
    }
    for (c, r) in &s.sync_requests {
        out.entry(c).or_default().sync_request = Some(r);
    }
    for (c, r) in s.rollout.iter().flat_map(|r| &r.clusters) {
        out.entry(c).or_default().rollout = Some(r);
    }
    out
}

/// The app's own record: everything but its cluster slots. Pure.
fn header_of(record: &AppRecord) -> AppRecord {
    let s = &record.status;
    AppRecord {
        doc: record.doc.clone(),
        origin: record.origin,
        generation: record.generation,
        status: AppStatus {
            revision: s.revision.clone(),
            observed_generation: s.observed_generation,
            last_error: s.last_error.clone(),
            last_error_at: s.last_error_at,
            target: BTreeMap::new(),
            assignments: BTreeMap::new(),
            history: s.history.clone(),
            rollout: s.rollout.as_ref().map(Rollout::without_clusters),
            next_rollout_id: s.next_rollout_id,
            stable_revision: s.stable_revision.clone(),
            pinned: s.pinned.clone(),
            sync_requests: BTreeMap::new(),
            next_sync_request: s.next_sync_request,
        },
    }
}

/// Puts a cluster's slot back into its app's record; an error (naming the slot) when the slot
/// holds rollout state but the app has no rollout.
fn join(record: &mut AppRecord, cluster: &str, slot: Slot) -> std::result::Result<(), String> {
    let s = &mut record.status;
    if let Some(t) = slot.target {
        s.target.insert(cluster.to_string(), t);
    }
    if let Some(a) = slot.assigned {
        s.assignments.insert(cluster.to_string(), a);
    }
    if let Some(r) = slot.sync_request {
        s.sync_requests.insert(cluster.to_string(), r);
    }
    if let Some(r) = slot.rollout {
        let Some(rollout) = s.rollout.as_mut() else {
            return Err(format!(
                "cluster {cluster:?} holds rollout state but the app has no rollout"
            ));
        };
        rollout.clusters.insert(cluster.to_string(), r);
    }
    Ok(())
}

/// Whether bytes decode as a cluster slot (a backup's check); the error if not.
pub fn check_slot(bytes: &[u8]) -> std::result::Result<(), String> {
    serde_json::from_slice::<Slot>(bytes)
        .map(drop)
        .map_err(|e| e.to_string())
}

fn slot_key(app: &str, cluster: &str) -> String {
    format!("{app}/{cluster}")
}

fn slot_prefix(app: &str) -> String {
    format!("{app}/")
}

/// What a write changes in the store, found by comparing the record before and after. Pure.
#[derive(Debug, Default)]
struct Delta {
    /// The app's own record, encoded, when it changed.
    header: Option<Vec<u8>>,
    /// Cluster → its slot encoded, or `None` for a slot that is gone.
    slots: BTreeMap<String, Option<Vec<u8>>>,
    /// The clusters whose orders moved: a slot's rollout bookkeeping alone (a cluster waiting
    /// for its step, say) is written but wakes nobody.
    ordered: std::collections::BTreeSet<String>,
    /// Whether what every cluster's orders depend on changed (see [`Touched::Everyone`]).
    everyone: bool,
}

impl Delta {
    fn between(before: Option<&AppRecord>, after: &AppRecord) -> Result<Self> {
        let name = &after.doc.metadata.name;
        let header = header_of(after);
        let header_changed = before.is_none_or(|b| header_of(b) != header);
        // A new app (or one replacing an unreadable record) had no slots to compare against.
        let old = before.map(slots_of).unwrap_or_default();
        let new = slots_of(after);
        let mut slots = BTreeMap::new();
        let mut ordered = std::collections::BTreeSet::new();
        for (cluster, slot) in &new {
            let was = old.get(cluster);
            if was != Some(slot) {
                let bytes = serde_json::to_vec(slot).map_err(|source| Error::Corrupt {
                    key: slot_key(name, cluster),
                    source,
                })?;
                slots.insert(cluster.to_string(), Some(bytes));
                // A cluster without a slot before had no orders from this app: the empty slot
                // is exactly what it was told.
                if was.copied().unwrap_or_default().orders() != slot.orders() {
                    ordered.insert(cluster.to_string());
                }
            }
        }
        for cluster in old.keys().filter(|c| !new.contains_key(*c)) {
            slots.insert(cluster.to_string(), None);
            ordered.insert(cluster.to_string());
        }
        // What `reports::orders_for` reads of an app beyond its slots.
        let everyone = before.is_none_or(|b| {
            b.doc != after.doc
                || b.generation != after.generation
                || b.status.observed_generation != after.status.observed_generation
                || b.status.revision.is_some() != after.status.revision.is_some()
        });
        Ok(Self {
            header: if header_changed {
                Some(encode(&header)?)
            } else {
                None
            },
            slots,
            ordered,
            everyone,
        })
    }

    fn touched(&self) -> Touched {
        if self.everyone {
            Touched::Everyone
        } else {
            Touched::Clusters(self.ordered.iter().cloned().collect())
        }
    }
}

/// An app as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppRecord {
    pub doc: AppDocument,
    pub origin: Origin,
    pub generation: u64,
    pub status: AppStatus,
}

/// How long a deleted app's tombstone tells agents to prune it: an agent away for longer keeps
/// the app's objects (and says so) rather than prune on a guess.
pub const TOMBSTONE_TTL_MS: i64 = 30 * 24 * 3600 * 1000;

/// An app record that does not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadableApp {
    pub name: String,
    /// The error, naming the record and the fix (it carries no secret).
    pub error: String,
}

/// Every app as stored: the ones that read, the ones that do not, and the names of apps deleted
/// within [`TOMBSTONE_TTL_MS`] (and not created again).
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// Shared with the store's cache: a catalog costs a pointer per app, not a decode.
    pub apps: Vec<Arc<AppRecord>>,
    pub unreadable: Vec<UnreadableApp>,
    pub deleted: Vec<String>,
}

impl Catalog {
    /// Whether `name` is an app the hub cannot read now.
    pub fn is_unreadable(&self, name: &str) -> bool {
        self.unreadable.iter().any(|u| u.name == name)
    }
}

/// Unreadable records seen so far, each audited once (name → error, audited).
#[derive(Default)]
struct Seen {
    unreadable: BTreeMap<String, (String, bool)>,
}

/// An app record as the cache holds it: decoded, or the error it does not decode with.
#[derive(Debug, Clone)]
enum Cached {
    Readable(Arc<AppRecord>),
    Unreadable(String),
}

/// Apps and bundles.
#[derive(Clone)]
pub struct AppStore {
    /// Every app record, decoded once at open and kept in step by every write (writes are
    /// serialized by `writes`): sessions, controllers and RPCs read without decoding.
    cache: Arc<std::sync::RwLock<BTreeMap<String, Cached>>>,
    /// Serializes read-modify-write of app records (renders, the rollout controller, operators).
    writes: std::sync::Arc<tokio::sync::Mutex<()>>,
    gate: crate::db::WriteGate,
    db: sled::Db,
    /// App → its own record ([`header_of`]).
    apps: sled::Tree,
    /// `<app>/<cluster>` → that cluster's [`Slot`].
    slots: sled::Tree,
    bundles: sled::Tree,
    /// Deleted app → when (ms since the epoch, big-endian i64).
    tombstones: sled::Tree,
    audit: crate::db::audit::Trees,
    seen: std::sync::Arc<std::sync::Mutex<Seen>>,
    /// Told of every committed write: whom it concerns.
    wake: Arc<Wakeups>,
}

fn unreadable(tree: &'static str, key: &str, app: &str, source: serde_json::Error) -> Error {
    Error::Unreadable {
        tree,
        key: key.to_string(),
        app: app.to_string(),
        source,
    }
}

fn encode(record: &AppRecord) -> Result<Vec<u8>> {
    serde_json::to_vec(record).map_err(|source| Error::Corrupt {
        key: record.doc.metadata.name.clone(),
        source,
    })
}

fn tombstone_time(name: &str, v: &[u8]) -> Result<i64> {
    <[u8; 8]>::try_from(v)
        .map(i64::from_be_bytes)
        .map_err(|_| Error::Internal(format!("tombstone of app {name:?} is not 8 bytes")))
}

/// Reads one app from its record and its cluster slots; `Err(Error::Unreadable)` naming the
/// first record that does not decode. A record of the release before the slots (cluster maps
/// inside it) reads as it is; the slots, where present, complete it.
fn load(apps: &sled::Tree, slots: &sled::Tree, name: &str) -> Result<Option<AppRecord>> {
    let Some(bytes) = apps.get(name)? else {
        return Ok(None);
    };
    let mut record: AppRecord =
        serde_json::from_slice(&bytes).map_err(|e| unreadable("apps", name, name, e))?;
    for kv in slots.scan_prefix(slot_prefix(name)) {
        let (k, v) = kv?;
        let key = String::from_utf8_lossy(&k).into_owned();
        let cluster = &key[slot_prefix(name).len()..];
        let slot: Slot =
            serde_json::from_slice(&v).map_err(|e| unreadable("app_clusters", &key, name, e))?;
        join(&mut record, cluster, slot).map_err(|m| {
            unreadable(
                "app_clusters",
                &key,
                name,
                <serde_json::Error as serde::de::Error>::custom(m),
            )
        })?;
    }
    Ok(Some(record))
}

/// Keys of every cluster slot an app has in the store.
fn slot_keys(slots: &sled::Tree, name: &str) -> Result<Vec<sled::IVec>> {
    slots
        .scan_prefix(slot_prefix(name))
        .keys()
        .map(|k| k.map_err(Error::from))
        .collect()
}

impl AppStore {
    pub fn open(db: &sled::Db, gate: crate::db::WriteGate, wake: Arc<Wakeups>) -> Result<Self> {
        let apps = db.open_tree("apps")?;
        let slots = db.open_tree("app_clusters")?;
        let mut cache = BTreeMap::new();
        let mut migrated = 0;
        for k in apps.iter().keys() {
            let k = k?;
            let name = String::from_utf8_lossy(&k).into_owned();
            let entry = match load(&apps, &slots, &name) {
                Ok(Some(record)) => {
                    if migrate(&apps, &slots, &record)? {
                        migrated += 1;
                    }
                    Cached::Readable(Arc::new(record))
                }
                Ok(None) => continue,
                Err(e @ Error::Unreadable { .. }) => Cached::Unreadable(e.to_string()),
                Err(e) => return Err(e),
            };
            cache.insert(name, entry);
        }
        if migrated > 0 {
            db.flush()?;
            tracing::info!(
                apps = migrated,
                "moved app records to per-cluster slots (records of an earlier release)"
            );
        }
        Ok(Self {
            cache: Arc::new(std::sync::RwLock::new(cache)),
            writes: Default::default(),
            gate,
            apps,
            slots,
            bundles: db.open_tree("bundles")?,
            tombstones: db.open_tree("app_tombstones")?,
            audit: crate::db::audit::Trees::open(db)?,
            seen: Default::default(),
            db: db.clone(),
            wake,
        })
    }

    /// Every tree an app write may touch, for one transaction over all of them.
    fn every_tree(
        &self,
    ) -> (
        &sled::Tree,
        &sled::Tree,
        &sled::Tree,
        &sled::Tree,
        &sled::Tree,
    ) {
        (
            &self.apps,
            &self.slots,
            &self.tombstones,
            &self.audit.log,
            &self.audit.meta,
        )
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        // Each critical section is one map update: a poisoned lock still holds sound data.
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cache(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Cached>> {
        // Every critical section is one map operation: a poisoned lock still holds sound data.
        self.cache.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the cache in step with a write that just committed (called with `writes` held).
    fn cached(&self, name: &str, entry: Option<Cached>) {
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        match entry {
            Some(e) => cache.insert(name.to_string(), e),
            None => cache.remove(name),
        };
    }

    /// One app, to change; `Err(Error::Unreadable)` when its record does not decode.
    pub fn get(&self, name: &str) -> Result<Option<AppRecord>> {
        Ok(self.get_shared(name)?.map(|r| (*r).clone()))
    }

    /// One app as the cache shares it (no copy); `Err(Error::Unreadable)` when its record does
    /// not decode.
    pub fn get_shared(&self, name: &str) -> Result<Option<Arc<AppRecord>>> {
        let entry = self.cache().get(name).cloned();
        match entry {
            None => Ok(None),
            Some(Cached::Readable(record)) => Ok(Some(record)),
            // The stored bytes again, for the decode error itself (its source is kept).
            Some(Cached::Unreadable(_)) => {
                let err = match load(&self.apps, &self.slots, name) {
                    Err(e) => e,
                    // Every write keeps the cache in step with the trees: this is a broken
                    // invariant, said as such rather than read as "no app".
                    Ok(None) => Error::Internal(format!(
                        "app record {name:?} is cached as unreadable but not in the store"
                    )),
                    Ok(Some(_)) => Error::Internal(format!(
                        "app record {name:?} decodes now but did not when it was written"
                    )),
                };
                self.note_unreadable(name, &err.to_string());
                Err(err)
            }
        }
    }

    /// Every app. An error only when the store itself failed (then nothing may be concluded from
    /// it); a record that does not decode is in [`Catalog::unreadable`], never left out.
    pub fn list(&self) -> Result<Catalog> {
        let mut catalog = Catalog::default();
        for (name, entry) in self.cache().iter() {
            match entry {
                Cached::Readable(record) => catalog.apps.push(Arc::clone(record)),
                Cached::Unreadable(error) => catalog.unreadable.push(UnreadableApp {
                    name: name.clone(),
                    error: error.clone(),
                }),
            }
        }
        let now = crate::now_ms();
        for kv in self.tombstones.iter() {
            let (k, v) = kv?;
            let name = String::from_utf8_lossy(&k).into_owned();
            if now - tombstone_time(&name, &v)? < TOMBSTONE_TTL_MS {
                catalog.deleted.push(name);
            }
        }
        let mut seen = self.seen();
        seen.unreadable
            .retain(|name, _| catalog.is_unreadable(name));
        for u in &catalog.unreadable {
            note(&mut seen, &u.name, &u.error);
        }
        Ok(catalog)
    }

    fn note_unreadable(&self, name: &str, error: &str) {
        note(&mut self.seen(), name, error);
    }

    /// Unreadable records not audited yet (each record once per distinct error); marks them.
    pub fn unaudited_unreadable(&self) -> Vec<UnreadableApp> {
        let mut seen = self.seen();
        seen.unreadable
            .iter_mut()
            .filter(|(_, (_, audited))| !*audited)
            .map(|(name, (error, audited))| {
                *audited = true;
                UnreadableApp {
                    name: name.clone(),
                    error: error.clone(),
                }
            })
            .collect()
    }

    /// Creates or updates an app's document; returns the record (status kept, generation bumped on
    /// change). `audit` is written with it, atomically (`None` only for changes nobody made).
    pub async fn put_document(
        &self,
        doc: AppDocument,
        origin: Origin,
        audit: impl Fn(&AppRecord) -> Option<Record>,
    ) -> Result<AppRecord> {
        let _write = self.writes.lock().await;
        let name = doc.metadata.name.clone();
        let record = match self.get(&name) {
            Ok(Some(mut existing)) => {
                if existing.doc != doc || existing.origin != origin {
                    existing.doc = doc;
                    existing.origin = origin;
                    existing.generation += 1;
                }
                existing
            }
            Ok(None) => AppRecord {
                doc,
                origin,
                generation: 1,
                status: AppStatus::default(),
            },
            // The operator's fix for an unreadable record: a new document replaces it. Its status
            // starts over (its generation past the old one's, when that much can be read), so
            // nothing is assigned or removed until the new document is rendered.
            Err(Error::Unreadable { .. }) => {
                tracing::warn!(app = %name, "replacing an unreadable app record with a new document");
                AppRecord {
                    doc,
                    origin,
                    generation: self.raw_generation(&name)? + 1,
                    status: AppStatus::default(),
                }
            }
            Err(e) => return Err(e),
        };
        self.put_with(Arc::new(record.clone()), audit(&record).as_ref())
            .await?;
        Ok(record)
    }

    /// The generation an unreadable record had, when that field still reads (else 0).
    fn raw_generation(&self, name: &str) -> Result<u64> {
        let raw = self.apps.get(name)?;
        // Only a hint for the replacement's generation: an unreadable field means "unknown".
        let generation = raw
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.get("generation").and_then(serde_json::Value::as_u64))
            .unwrap_or(0);
        Ok(generation)
    }

    /// Writes a record and flushes.
    pub async fn put(&self, record: &AppRecord) -> Result<()> {
        let _write = self.writes.lock().await;
        self.put_with(Arc::new(record.clone()), None).await
    }

    /// Writes what changed of a record since the cache's copy — its own record and the slots of
    /// the clusters it changed, with its audit entry, in one transaction — flushes, and wakes
    /// whom it concerns.
    async fn put_with(&self, record: Arc<AppRecord>, audit: Option<&Record>) -> Result<()> {
        let _gate = self.gate.read().await;
        let name = &record.doc.metadata.name;
        let before = match self.cache().get(name) {
            Some(Cached::Readable(r)) => Some(Arc::clone(r)),
            _ => None,
        };
        let mut delta = Delta::between(before.as_deref(), &record)?;
        if before.is_none() {
            // A new app, or one replacing an unreadable record: no slot of before survives.
            for k in slot_keys(&self.slots, name)? {
                let cluster = String::from_utf8_lossy(&k[slot_prefix(name).len()..]).into_owned();
                delta.slots.entry(cluster).or_insert(None);
            }
        }
        let key = name.as_bytes();
        // The controllers' own updates (renders, rollouts) come without an audit entry; an
        // operator's (or the fleet repository's) with one, and the name then no longer a
        // tombstone. Either way one transaction.
        self.every_tree()
            .transaction(|(apps, slots, tombstones, log, meta)| {
                if let Some(h) = &delta.header {
                    apps.insert(key, h.as_slice())?;
                }
                for (cluster, bytes) in &delta.slots {
                    let k = slot_key(name, cluster);
                    match bytes {
                        Some(b) => slots.insert(k.as_bytes(), b.as_slice())?,
                        None => slots.remove(k.as_bytes())?,
                    };
                }
                if let Some(a) = audit {
                    tombstones.remove(key)?;
                    crate::db::audit::append_in(log, meta, a)?;
                }
                Ok(())
            })?;
        crate::db::flush(&self.db).await?;
        self.cached(name, Some(Cached::Readable(Arc::clone(&record))));
        self.seen().unreadable.remove(name);
        self.wake.wake(&delta.touched());
        if delta.header.is_some() || !delta.slots.is_empty() {
            self.wake.app_changed(name);
        }
        Ok(())
    }

    /// Updates an app's record if it still exists; written (and flushed) only when it changed.
    pub async fn update_status(
        &self,
        name: &str,
        update: impl FnOnce(&mut AppRecord),
    ) -> Result<Option<Arc<AppRecord>>> {
        self.try_update(name, |r| {
            update(r);
            Ok(())
        })
        .await
    }

    /// Like [`Self::update_status`], for updates that can refuse (nothing is written on error).
    pub async fn try_update(
        &self,
        name: &str,
        update: impl FnOnce(&mut AppRecord) -> Result<()>,
    ) -> Result<Option<Arc<AppRecord>>> {
        self.try_update_audited(name, update, |_| None).await
    }

    /// An operator's update: written with its audit entry (made from the updated record) in one
    /// transaction — also when the update changed nothing stored, since the operator did act.
    /// Returns the record as stored (shared with the cache: one copy per update, not two).
    pub async fn try_update_audited(
        &self,
        name: &str,
        update: impl FnOnce(&mut AppRecord) -> Result<()>,
        audit: impl FnOnce(&AppRecord) -> Option<Record>,
    ) -> Result<Option<Arc<AppRecord>>> {
        let _write = self.writes.lock().await;
        let Some(before) = self.get_shared(name)? else {
            return Ok(None);
        };
        let mut record = (*before).clone();
        update(&mut record)?;
        let audit = audit(&record);
        if record == *before && audit.is_none() {
            return Ok(Some(before));
        }
        let record = Arc::new(record);
        self.put_with(Arc::clone(&record), audit.as_ref()).await?;
        Ok(Some(record))
    }

    /// Deletes an app, readable or not, with its audit entry and a tombstone (so agents that
    /// run it are told to prune it), atomically; whether it existed.
    pub async fn delete(&self, name: &str, audit: Option<&Record>) -> Result<bool> {
        let _write = self.writes.lock().await;
        let _gate = self.gate.read().await;
        let at = crate::now_ms().to_be_bytes();
        let slot_keys = slot_keys(&self.slots, name)?;
        let existed = self
            .every_tree()
            .transaction(|(apps, slots, tombstones, log, meta)| {
                let existed = apps.remove(name.as_bytes())?.is_some();
                for k in &slot_keys {
                    slots.remove(k)?;
                }
                if existed {
                    tombstones.insert(name.as_bytes(), &at[..])?;
                    if let Some(a) = audit {
                        crate::db::audit::append_in(log, meta, a)?;
                    }
                }
                Ok(existed)
            })?;
        crate::db::flush(&self.db).await?;
        self.cached(name, None);
        self.seen().unreadable.remove(name);
        if existed {
            self.wake.wake(&Touched::Everyone);
            self.wake.app_changed(name);
        }
        Ok(existed)
    }

    /// Forgets tombstones older than [`TOMBSTONE_TTL_MS`]; how many.
    pub fn expire_tombstones(&self) -> Result<usize> {
        let now = crate::now_ms();
        let mut expired = 0;
        for kv in self.tombstones.iter() {
            let (k, v) = kv?;
            if now - tombstone_time(&String::from_utf8_lossy(&k), &v)? >= TOMBSTONE_TTL_MS {
                self.tombstones.remove(k)?;
                expired += 1;
            }
        }
        Ok(expired)
    }

    /// Test hook (`FLOTILLA_TEST_HOOKS`): stores raw bytes as an app's whole record (its cluster
    /// slots gone), as a hand edit or a version skew would leave it.
    pub async fn put_raw_for_test(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let _write = self.writes.lock().await;
        let _gate = self.gate.read().await;
        for k in slot_keys(&self.slots, name)? {
            self.slots.remove(k)?;
        }
        self.apps.insert(name.as_bytes(), bytes)?;
        crate::db::flush(&self.db).await?;
        let entry = match load(&self.apps, &self.slots, name) {
            Ok(Some(record)) => Cached::Readable(Arc::new(record)),
            Ok(None) => return Err(Error::Internal(format!("app record {name:?} vanished"))),
            Err(e @ Error::Unreadable { .. }) => Cached::Unreadable(e.to_string()),
            Err(e) => return Err(e),
        };
        self.cached(name, Some(entry));
        self.wake.wake(&Touched::Everyone);
        self.wake.app_changed(name);
        Ok(())
    }

    /// Stores a bundle under its digest (once); returns the compressed size.
    pub fn put_bundle(&self, digest: &str, canonical: &[u8]) -> Result<usize> {
        if let Some(existing) = self.bundles.get(digest)? {
            return Ok(existing.len());
        }
        let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(canonical)
            .map_err(|e| Error::Internal(format!("compressing a bundle: {e}")))?;
        let compressed = enc
            .finish()
            .map_err(|e| Error::Internal(format!("compressing a bundle: {e}")))?;
        let len = compressed.len();
        self.bundles.insert(digest, compressed)?;
        Ok(len)
    }

    /// A stored bundle's canonical bytes.
    pub fn bundle(&self, digest: &str) -> Result<Option<Vec<u8>>> {
        let Some(compressed) = self.bundles.get(digest)? else {
            return Ok(None);
        };
        let mut out = Vec::new();
        flate2::read::ZlibDecoder::new(&compressed[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::Internal(format!("bundle {digest} is corrupt: {e}")))?;
        Ok(Some(out))
    }

    /// Number of stored bundles and their total compressed bytes.
    pub fn bundle_usage(&self) -> Result<(usize, u64)> {
        self.bundles.iter().try_fold((0, 0), |(n, b), kv| {
            let (_, v) = kv?;
            Ok((n + 1, b + v.len() as u64))
        })
    }

    pub async fn flush(&self) -> Result<()> {
        crate::db::flush(&self.db).await?;
        Ok(())
    }
}

/// Rewrites a record of an earlier release (cluster maps inside the app's record, history by
/// cluster) as the app's own record plus one slot per cluster, in one transaction; whether it
/// had to. A record already in this form is left alone.
fn migrate(apps: &sled::Tree, slots: &sled::Tree, record: &AppRecord) -> Result<bool> {
    let name = &record.doc.metadata.name;
    let header = encode(&header_of(record))?;
    if apps.get(name)?.is_some_and(|stored| stored == header) {
        return Ok(false);
    }
    let mut rows = Vec::new();
    for (cluster, slot) in slots_of(record) {
        let bytes = serde_json::to_vec(&slot).map_err(|source| Error::Corrupt {
            key: slot_key(name, cluster),
            source,
        })?;
        rows.push((slot_key(name, cluster), bytes));
    }
    (apps, slots).transaction(|(apps, slots)| {
        apps.insert(name.as_bytes(), header.as_slice())?;
        for (k, v) in &rows {
            slots.insert(k.as_bytes(), v.as_slice())?;
        }
        Ok(())
    })?;
    Ok(true)
}

/// Records an unreadable record in `seen`; a changed error is audited again.
fn note(seen: &mut Seen, name: &str, error: &str) {
    match seen.unreadable.get(name) {
        Some((known, _)) if known == error => {}
        _ => {
            tracing::error!(
                app = name,
                error,
                "app record unreadable: holding the app on every cluster"
            );
            seen.unreadable
                .insert(name.to_string(), (error.to_string(), false));
        }
    }
}

/// An app named `web` with `spec` (YAML under `spec:`), rendered at revision `r1` and nothing
/// more: for tests to fill in.
#[cfg(test)]
pub(crate) fn rendered_web(spec: &str) -> AppRecord {
    let doc = AppDocument::parse(&format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: web}}\nspec:\n  source: {{repoURL: \"file:///r\"}}\n{spec}"
    ))
    .expect("a test's App document parses");
    AppRecord {
        doc,
        origin: Origin::Api,
        generation: 1,
        status: AppStatus {
            revision: Some("r1".into()),
            observed_generation: 1,
            ..AppStatus::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::{ClusterState, Phase};

    fn db() -> sled::Db {
        sled::Config::new().temporary(true).open().unwrap()
    }

    fn open_store(db: &sled::Db) -> (AppStore, Arc<Wakeups>) {
        let wake = Arc::new(Wakeups::default());
        let store = AppStore::open(db, Default::default(), Arc::clone(&wake)).unwrap();
        (store, wake)
    }

    fn to(digest: &str) -> Assigned {
        Assigned {
            digest: digest.into(),
            revision: "r1".into(),
        }
    }

    /// An app on `clusters`, each assigned `d`, mid-rollout.
    fn record(clusters: &[&str]) -> AppRecord {
        let mut record = rendered_web("  targets: {clusters: [a]}\n");
        let status = &mut record.status;
        let mut rollout = Rollout {
            id: 1,
            revision: "r1".into(),
            generation: 1,
            phase: Phase::Progressing,
            current_step: 0,
            steps: vec!["all".into()],
            step_healthy_since: None,
            paused: None,
            promote: false,
            tolerated_failures: 0,
            message: String::new(),
            clusters: BTreeMap::new(),
            started_at: 1,
            finished_at: None,
            max_updating: 0,
        };
        for c in clusters {
            status.target.insert(c.to_string(), to("d"));
            status.assignments.insert(c.to_string(), to("d"));
            rollout.clusters.insert(
                c.to_string(),
                ClusterRollout {
                    step: 0,
                    from: None,
                    to: to("d"),
                    state: ClusterState::Updating,
                    since: 1,
                    reason: String::new(),
                },
            );
        }
        let digests = clusters
            .iter()
            .map(|c| (c.to_string(), "d".to_string()))
            .collect();
        status
            .history
            .push(HistoryEntry::of_render("r1", 1, &digests));
        status.rollout = Some(rollout);
        record
    }

    #[tokio::test]
    async fn one_clusters_change_writes_its_slot_and_wakes_only_its_session() {
        let db = db();
        let (store, wake) = open_store(&db);
        let clusters: Vec<String> = (0..100).map(|i| format!("c{i}")).collect();
        let names: Vec<&str> = clusters.iter().map(String::as_str).collect();
        store.put(&record(&names)).await.unwrap();
        let header = db.open_tree("apps").unwrap().get("web").unwrap().unwrap();
        assert!(
            header.len() < 2_000,
            "the app's own record does not grow with its clusters: {} bytes",
            header.len()
        );
        assert_eq!(db.open_tree("app_clusters").unwrap().len(), 100);
        wake.take_dirty();

        let mut c7 = wake.subscribe("c7");
        let c8 = wake.subscribe("c8");
        let slots = db.open_tree("app_clusters").unwrap();
        let mut watch = slots.watch_prefix("");
        store
            .update_status("web", |r| {
                r.status.assignments.insert("c7".into(), to("e"));
            })
            .await
            .unwrap();
        let event = watch
            .next_timeout(std::time::Duration::from_secs(1))
            .unwrap();
        assert_eq!(event.key(), b"web/c7");
        assert!(
            watch
                .next_timeout(std::time::Duration::from_millis(50))
                .is_err(),
            "one slot written"
        );
        assert_eq!(
            db.open_tree("apps").unwrap().get("web").unwrap().unwrap(),
            header
        );
        assert!(c7.rx.has_changed().unwrap());
        assert!(
            !c8.rx.has_changed().unwrap(),
            "another cluster's session sleeps on"
        );
        assert_eq!(wake.take_dirty().into_iter().collect::<Vec<_>>(), ["web"]);

        // A change of the document concerns every cluster.
        c7.rx.mark_unchanged();
        store
            .update_status("web", |r| r.doc.spec.namespace = "other".into())
            .await
            .unwrap();
        assert!(c7.rx.has_changed().unwrap() && c8.rx.has_changed().unwrap());
    }

    #[tokio::test]
    async fn records_read_back_whole_after_reopen_and_deletes_leave_no_slot() {
        let db = db();
        let original = record(&["a", "b", "c"]);
        {
            let (store, _) = open_store(&db);
            store.put(&original).await.unwrap();
            store
                .update_status("web", |r| {
                    r.status.target.remove("c");
                    r.status.assignments.remove("c");
                    r.status.rollout.as_mut().unwrap().clusters.remove("c");
                })
                .await
                .unwrap();
        }
        let (store, _) = open_store(&db);
        let read = store.get("web").unwrap().unwrap();
        let mut want = original;
        want.status.target.remove("c");
        want.status.assignments.remove("c");
        want.status.rollout.as_mut().unwrap().clusters.remove("c");
        assert_eq!(read, want);
        assert_eq!(db.open_tree("app_clusters").unwrap().len(), 2);
        assert!(store.delete("web", None).await.unwrap());
        assert_eq!(db.open_tree("app_clusters").unwrap().len(), 0);
    }

    /// The JSON the release before the slots wrote: cluster maps inside the app's record and each
    /// history entry by cluster.
    fn legacy_json(clusters: &[&str]) -> Vec<u8> {
        let mut v = serde_json::to_value(record(clusters)).unwrap();
        let digests: serde_json::Map<String, serde_json::Value> = clusters
            .iter()
            .map(|c| (c.to_string(), "d".into()))
            .collect();
        v["status"]["history"][0] = serde_json::json!({
            "revision": "r1", "at": 1, "digests": digests, "rolled_out": true,
        });
        serde_json::to_vec(&v).unwrap()
    }

    #[tokio::test]
    async fn a_record_of_the_earlier_release_moves_to_slots_at_open_and_reads_the_same() {
        let db = db();
        db.open_tree("apps")
            .unwrap()
            .insert("web", legacy_json(&["a", "b"]))
            .unwrap();
        let (store, _) = open_store(&db);
        let read = store.get("web").unwrap().unwrap();
        let mut want = record(&["a", "b"]);
        want.status.history[0].rolled_out = true;
        assert_eq!(read, want);
        assert_eq!(
            read.status.history[0].bundles,
            BTreeMap::from([("d".to_string(), 2)])
        );
        assert_eq!(db.open_tree("app_clusters").unwrap().len(), 2);
        let header: serde_json::Value =
            serde_json::from_slice(&db.open_tree("apps").unwrap().get("web").unwrap().unwrap())
                .unwrap();
        assert_eq!(
            header["status"]["assignments"],
            serde_json::json!({}),
            "{header}"
        );
        // Opening again finds nothing to move and reads the same.
        let (again, _) = open_store(&db);
        assert_eq!(again.get("web").unwrap().unwrap(), want);
    }

    #[tokio::test]
    async fn an_unreadable_slot_holds_the_whole_app_and_names_itself() {
        let db = db();
        {
            let (store, _) = open_store(&db);
            store.put(&record(&["a", "b"])).await.unwrap();
        }
        db.open_tree("app_clusters")
            .unwrap()
            .insert("web/b", &b"{\"assigned\": 5}"[..])
            .unwrap();
        let (store, _) = open_store(&db);
        let catalog = store.list().unwrap();
        assert!(catalog.apps.is_empty());
        assert!(catalog.is_unreadable("web"));
        let err = store.get("web").unwrap_err().to_string();
        assert!(
            err.contains("\"web/b\"") && err.contains("app_clusters"),
            "{err}"
        );
        assert!(err.contains("flotilla app delete web`"), "{err}");
    }
}
