//! Durable app state in sled: app documents with their status and revision history, rendered
//! bundles stored once per digest (compressed), and tombstones of deleted apps. A record that does
//! not decode is never skipped silently: reads return it as an [`UnreadableApp`], so callers hold
//! that app instead of treating it as absent (absent means "prune it" to an agent).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use sled::Transactional;

use crate::apps::AppDocument;
use crate::audit::Record;
use crate::rollout::{Assigned, Rollout};
use crate::{Error, Result};

/// How many revisions an app's history keeps.
pub const HISTORY_LIMIT: usize = 50;

/// One rendered revision of an app.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub revision: String,
    pub at: i64,
    /// Cluster → bundle digest.
    pub digests: BTreeMap<String, String>,
    /// A rollout of this revision succeeded: it is a stable revision to roll back to.
    #[serde(default)]
    pub rolled_out: bool,
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

/// An app as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppRecord {
    pub doc: AppDocument,
    /// `api` (flotilla app apply) or `fleet` (the fleet repository).
    pub origin: String,
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

fn decoded(name: &str, bytes: &[u8]) -> Cached {
    match serde_json::from_slice(bytes) {
        Ok(record) => Cached::Readable(Arc::new(record)),
        Err(e) => Cached::Unreadable(unreadable(name, e).to_string()),
    }
}

/// Apps and bundles.
#[derive(Clone)]
pub struct AppStore {
    /// Every app record, decoded once at open and kept in step by every write (writes are
    /// serialized by `writes`): sessions, controllers and RPCs read without decoding.
    cache: Arc<std::sync::RwLock<BTreeMap<String, Cached>>>,
    /// Serializes read-modify-write of app records (renders, the rollout controller, operators).
    writes: std::sync::Arc<tokio::sync::Mutex<()>>,
    gate: crate::store::WriteGate,
    db: sled::Db,
    apps: sled::Tree,
    bundles: sled::Tree,
    /// Deleted app → when (ms since the epoch, big-endian i64).
    tombstones: sled::Tree,
    audit: crate::audit::Trees,
    seen: std::sync::Arc<std::sync::Mutex<Seen>>,
}

fn unreadable(key: &str, source: serde_json::Error) -> Error {
    Error::Unreadable {
        tree: "apps",
        key: key.to_string(),
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

impl AppStore {
    pub fn open(db: &sled::Db, gate: crate::store::WriteGate) -> Result<Self> {
        let apps = db.open_tree("apps")?;
        let mut cache = BTreeMap::new();
        for kv in apps.iter() {
            let (k, v) = kv?;
            let name = String::from_utf8_lossy(&k).into_owned();
            let entry = decoded(&name, &v);
            cache.insert(name, entry);
        }
        Ok(Self {
            cache: Arc::new(std::sync::RwLock::new(cache)),
            writes: Default::default(),
            gate,
            apps,
            bundles: db.open_tree("bundles")?,
            tombstones: db.open_tree("app_tombstones")?,
            audit: crate::audit::Trees::open(db)?,
            seen: Default::default(),
            db: db.clone(),
        })
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
                let Some(bytes) = self.apps.get(name)? else {
                    // Every write keeps the cache in step with the tree: this is a broken
                    // invariant, said as such rather than read as "no app".
                    return Err(Error::Internal(format!(
                        "app record {name:?} is cached as unreadable but not in the store"
                    )));
                };
                let err = match serde_json::from_slice::<AppRecord>(&bytes) {
                    Err(e) => unreadable(name, e),
                    Ok(_) => Error::Internal(format!(
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
        origin: &str,
        audit: impl Fn(&AppRecord) -> Option<Record>,
    ) -> Result<AppRecord> {
        let _write = self.writes.lock().await;
        let name = doc.metadata.name.clone();
        let record = match self.get(&name) {
            Ok(Some(mut existing)) => {
                if existing.doc != doc || existing.origin != origin {
                    existing.doc = doc;
                    existing.origin = origin.to_string();
                    existing.generation += 1;
                }
                existing
            }
            Ok(None) => AppRecord {
                doc,
                origin: origin.to_string(),
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
                    origin: origin.to_string(),
                    generation: self.raw_generation(&name)? + 1,
                    status: AppStatus::default(),
                }
            }
            Err(e) => return Err(e),
        };
        self.put_with(&record, audit(&record).as_ref()).await?;
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
        self.put_with(record, None).await
    }

    /// Writes a record (with its audit entry, in one transaction) and flushes.
    async fn put_with(&self, record: &AppRecord, audit: Option<&Record>) -> Result<()> {
        let _gate = self.gate.read().await;
        let bytes = encode(record)?;
        let key = record.doc.metadata.name.as_bytes();
        match audit {
            // The controllers' own updates (renders, rollouts): one tree, no transaction needed.
            None => {
                self.apps.insert(key, bytes)?;
            }
            // An operator's (or the fleet repository's) write: with its audit entry, and the name
            // no longer a tombstone.
            Some(a) => {
                (
                    &self.apps,
                    &self.tombstones,
                    &self.audit.log,
                    &self.audit.meta,
                )
                    .transaction(|(apps, tombstones, log, meta)| {
                        apps.insert(key, bytes.clone())?;
                        tombstones.remove(key)?;
                        crate::audit::append_in(log, meta, a)?;
                        Ok(())
                    })?;
            }
        }
        crate::store::flush(&self.db).await?;
        let name = &record.doc.metadata.name;
        self.cached(name, Some(Cached::Readable(Arc::new(record.clone()))));
        self.seen().unreadable.remove(name);
        Ok(())
    }

    /// Updates an app's record if it still exists; written (and flushed) only when it changed.
    pub async fn update_status(
        &self,
        name: &str,
        update: impl FnOnce(&mut AppRecord),
    ) -> Result<Option<AppRecord>> {
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
    ) -> Result<Option<AppRecord>> {
        self.try_update_audited(name, update, |_| None).await
    }

    /// An operator's update: written with its audit entry (made from the updated record) in one
    /// transaction — also when the update changed nothing stored, since the operator did act.
    pub async fn try_update_audited(
        &self,
        name: &str,
        update: impl FnOnce(&mut AppRecord) -> Result<()>,
        audit: impl FnOnce(&AppRecord) -> Option<Record>,
    ) -> Result<Option<AppRecord>> {
        let _write = self.writes.lock().await;
        let Some(mut record) = self.get(name)? else {
            return Ok(None);
        };
        let before = record.clone();
        update(&mut record)?;
        let audit = audit(&record);
        if record != before || audit.is_some() {
            self.put_with(&record, audit.as_ref()).await?;
        }
        Ok(Some(record))
    }

    /// Deletes an app, readable or not, with its audit entry and a tombstone (so agents that
    /// run it are told to prune it), atomically; whether it existed.
    pub async fn delete(&self, name: &str, audit: Option<&Record>) -> Result<bool> {
        let _write = self.writes.lock().await;
        let _gate = self.gate.read().await;
        let at = crate::now_ms().to_be_bytes();
        let existed = (
            &self.apps,
            &self.tombstones,
            &self.audit.log,
            &self.audit.meta,
        )
            .transaction(|(apps, tombstones, log, meta)| {
                let existed = apps.remove(name.as_bytes())?.is_some();
                if existed {
                    tombstones.insert(name.as_bytes(), &at[..])?;
                    if let Some(a) = audit {
                        crate::audit::append_in(log, meta, a)?;
                    }
                }
                Ok(existed)
            })?;
        crate::store::flush(&self.db).await?;
        self.cached(name, None);
        self.seen().unreadable.remove(name);
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

    /// Test hook (`FLOTILLA_TEST_HOOKS`): stores raw bytes as an app's record, as a hand edit or
    /// a version skew would leave it.
    pub async fn put_raw_for_test(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let _write = self.writes.lock().await;
        let _gate = self.gate.read().await;
        self.apps.insert(name.as_bytes(), bytes)?;
        crate::store::flush(&self.db).await?;
        self.cached(name, Some(decoded(name, bytes)));
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
        crate::store::flush(&self.db).await?;
        Ok(())
    }
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
