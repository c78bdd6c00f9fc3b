//! Durable app state in sled: app documents with their status and revision history, and rendered
//! bundles stored once per digest, compressed.

use std::collections::BTreeMap;
use std::io::{Read, Write};

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

/// Apps and bundles.
#[derive(Clone)]
pub struct AppStore {
    /// Serializes read-modify-write of app records (renders, the rollout controller, operators).
    writes: std::sync::Arc<tokio::sync::Mutex<()>>,
    gate: crate::store::WriteGate,
    db: sled::Db,
    apps: sled::Tree,
    bundles: sled::Tree,
    audit: crate::audit::Trees,
}

fn corrupt(key: &str, source: serde_json::Error) -> Error {
    Error::Corrupt {
        key: key.to_string(),
        source,
    }
}

impl AppStore {
    pub fn open(db: &sled::Db, gate: crate::store::WriteGate) -> Result<Self> {
        Ok(Self {
            writes: Default::default(),
            gate,
            apps: db.open_tree("apps")?,
            bundles: db.open_tree("bundles")?,
            audit: crate::audit::Trees::open(db)?,
            db: db.clone(),
        })
    }

    pub fn get(&self, name: &str) -> Result<Option<AppRecord>> {
        self.apps
            .get(name)?
            .map(|b| serde_json::from_slice(&b).map_err(|e| corrupt(name, e)))
            .transpose()
    }

    pub fn list(&self) -> Result<Vec<AppRecord>> {
        self.apps
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                serde_json::from_slice(&v).map_err(|e| corrupt(&String::from_utf8_lossy(&k), e))
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
        let record = match self.get(&name)? {
            Some(mut existing) => {
                if existing.doc != doc || existing.origin != origin {
                    existing.doc = doc;
                    existing.origin = origin.to_string();
                    existing.generation += 1;
                }
                existing
            }
            None => AppRecord {
                doc,
                origin: origin.to_string(),
                generation: 1,
                status: AppStatus::default(),
            },
        };
        self.put_with(&record, audit(&record).as_ref()).await?;
        Ok(record)
    }

    /// Writes a record and flushes.
    pub async fn put(&self, record: &AppRecord) -> Result<()> {
        self.put_with(record, None).await
    }

    /// Writes a record (with its audit entry, in one transaction) and flushes.
    async fn put_with(&self, record: &AppRecord, audit: Option<&Record>) -> Result<()> {
        let _gate = self.gate.read().await;
        let bytes =
            serde_json::to_vec(record).map_err(|e| corrupt(&record.doc.metadata.name, e))?;
        let key = record.doc.metadata.name.as_bytes();
        match audit {
            // The controllers' own updates (renders, rollouts): one tree, no transaction needed.
            None => {
                self.apps.insert(key, bytes)?;
            }
            Some(a) => {
                (&self.apps, &self.audit.log, &self.audit.meta).transaction(
                    |(apps, log, meta)| {
                        apps.insert(key, bytes.clone())?;
                        crate::audit::append_in(log, meta, a)?;
                        Ok(())
                    },
                )?;
            }
        }
        crate::store::flush(&self.db).await?;
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

    /// Deletes an app (with its audit entry, atomically); whether it existed.
    pub async fn delete(&self, name: &str, audit: Option<&Record>) -> Result<bool> {
        let _write = self.writes.lock().await;
        let _gate = self.gate.read().await;
        let existed =
            (&self.apps, &self.audit.log, &self.audit.meta).transaction(|(apps, log, meta)| {
                let existed = apps.remove(name.as_bytes())?.is_some();
                if existed && let Some(a) = audit {
                    crate::audit::append_in(log, meta, a)?;
                }
                Ok(existed)
            })?;
        crate::store::flush(&self.db).await?;
        Ok(existed)
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
    pub fn bundle_usage(&self) -> (usize, u64) {
        self.bundles
            .iter()
            .filter_map(|kv| kv.ok())
            .fold((0, 0), |(n, b), (_, v)| (n + 1, b + v.len() as u64))
    }

    pub async fn flush(&self) -> Result<()> {
        crate::store::flush(&self.db).await?;
        Ok(())
    }
}
