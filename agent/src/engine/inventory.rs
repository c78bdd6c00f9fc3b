//! An app's inventory: what the agent applied for it (object refs) and from which bundle (digest).
//! Kept in the cluster (a ConfigMap in the agent's namespace, so it survives the agent's machine)
//! and in a local sled cache (so it survives the ConfigMap being deleted).

use std::path::Path;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, Patch, PatchParams};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::cache_mirror::Mirror;
use super::plan::ObjRef;
use super::{AppSpec, FIELD_MANAGER};
use crate::{Error, Result};

/// The agent's namespace in each cluster.
pub const AGENT_NAMESPACE: &str = "flotilla-system";

/// What an app has in a cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    pub digest: String,
    pub objects: Vec<ObjRef>,
    /// The digest whose hooks (PreSync, Sync, PostSync) last ran to completion: hooks run once per
    /// new revision, not on every resync.
    #[serde(default)]
    pub hooks_synced: Option<String>,
    /// The last operator sync request (`flotilla app sync`) carried out to completion: each is
    /// carried out once, also across restarts.
    #[serde(default)]
    pub sync_request: u64,
    /// Hook objects earlier runs left in the cluster (a Job whose policy keeps it): the app's,
    /// replaced by the hook's next run and pruned with the app.
    #[serde(default)]
    pub hooks: Vec<ObjRef>,
}

/// A bundle as cached for offline reconciling.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CachedBundle {
    pub spec: AppSpec,
    pub objects: Vec<serde_json::Value>,
    /// The hub's digest of the bundle (empty for bundles applied by hand).
    #[serde(default)]
    pub digest: String,
    #[serde(default)]
    pub revision: String,
}

/// Local durable state of the engine: inventories and the last desired bundle per app.
#[derive(Clone)]
pub struct LocalCache {
    db: sled::Db,
    inventories: sled::Tree,
    /// Sealed under `key`: bundles carry Secret data.
    bundles: sled::Tree,
    key: std::sync::Arc<crate::cache_seal::CacheKey>,
    /// In-cluster: every bundle also kept in a Secret, for a pod rescheduled onto an empty disk.
    mirror: Option<std::sync::Arc<Mirror>>,
}

impl LocalCache {
    pub fn open(dir: &Path, key: crate::cache_seal::CacheKey) -> Result<Self> {
        let db = sled::open(dir.join("engine")).map_err(|e| Error::Cache(e.to_string()))?;
        Ok(Self {
            mirror: None,
            key: std::sync::Arc::new(key),
            inventories: db
                .open_tree("inventories")
                .map_err(|e| Error::Cache(e.to_string()))?,
            bundles: db
                .open_tree("bundles")
                .map_err(|e| Error::Cache(e.to_string()))?,
            db,
        })
    }

    /// Keeps every bundle in a Secret too (see [`Mirror`]).
    pub fn with_mirror(mut self, mirror: Mirror) -> Self {
        self.mirror = Some(std::sync::Arc::new(mirror));
        self
    }

    /// Brings back the mirrored bundles of apps this disk does not hold (a rescheduled pod's empty
    /// disk); returns them. Apps the disk holds keep the disk's copy: every save writes both.
    pub async fn restore(&self) -> Result<Vec<String>> {
        let Some(mirror) = &self.mirror else {
            return Ok(Vec::new());
        };
        let mut restored = Vec::new();
        for (app, sealed) in mirror.load_all().await? {
            if self
                .bundles
                .contains_key(&app)
                .map_err(|e| Error::Cache(e.to_string()))?
            {
                continue;
            }
            // Checked before it is trusted as a bundle; one that cannot be read is left to the
            // hub's assignment, and the others are still restored.
            let plain = Mirror::open(&self.key, &app, &sealed).and_then(|plain| {
                serde_json::from_slice::<CachedBundle>(&plain)
                    .map(|_| plain)
                    .map_err(|e| Error::Cache(format!("the mirrored bundle of {app}: {e}")))
            });
            let plain = match plain {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(app, error = %e, "a mirrored bundle is unreadable; waiting for the hub");
                    continue;
                }
            };
            let sealed = self.key.seal(&app, &plain)?;
            self.bundles
                .insert(app.as_bytes(), sealed)
                .map_err(|e| Error::Cache(e.to_string()))?;
            restored.push(app);
        }
        flush(&self.db).await?;
        Ok(restored)
    }

    pub fn inventory(&self, app: &str) -> Result<Option<Inventory>> {
        let bytes = self
            .inventories
            .get(app)
            .map_err(|e| Error::Cache(e.to_string()))?;
        bytes
            .map(|b| {
                serde_json::from_slice(&b)
                    .map_err(|e| Error::Cache(format!("inventory of {app}: {e}")))
            })
            .transpose()
    }

    pub async fn save_inventory(&self, app: &str, inv: &Inventory) -> Result<()> {
        let bytes = serde_json::to_vec(inv).map_err(|e| Error::Cache(e.to_string()))?;
        self.inventories
            .insert(app, bytes)
            .map_err(|e| Error::Cache(e.to_string()))?;
        flush(&self.db).await?;
        Ok(())
    }

    /// The last desired bundle of `app` and how it is to be applied, for reconciling while the hub
    /// is unreachable.
    pub fn bundle(&self, app: &str) -> Result<Option<CachedBundle>> {
        let bytes = self
            .bundles
            .get(app)
            .map_err(|e| Error::Cache(e.to_string()))?;
        bytes
            .map(|b| {
                let plain = self.key.open(app, &b)?;
                serde_json::from_slice(&plain)
                    .map_err(|e| Error::Cache(format!("bundle of {app}: {e}")))
            })
            .transpose()
    }

    pub async fn save_bundle(
        &self,
        spec: &AppSpec,
        objects: &[serde_json::Value],
        digest: &str,
        revision: &str,
    ) -> Result<()> {
        let app = spec.name.as_str();
        let cached = CachedBundle {
            spec: spec.clone(),
            objects: objects.to_vec(),
            digest: digest.to_string(),
            revision: revision.to_string(),
        };
        let bytes = serde_json::to_vec(&cached).map_err(|e| Error::Cache(e.to_string()))?;
        let sealed = self.key.seal(app, &bytes)?;
        self.bundles
            .insert(app, sealed)
            .map_err(|e| Error::Cache(e.to_string()))?;
        flush(&self.db).await?;
        if let Some(mirror) = &self.mirror {
            match Mirror::seal(&self.key, app, &bytes)? {
                Some(sealed) => mirror.save(app, sealed).await?,
                None => tracing::warn!(
                    app,
                    limit = super::cache_mirror::MAX_SEALED_BYTES,
                    "the bundle is too large for a Secret even compressed; only this pod's disk keeps it"
                ),
            }
        }
        Ok(())
    }

    /// Forgets an app (it left the assignments and was pruned).
    pub async fn forget(&self, app: &str) -> Result<()> {
        self.bundles
            .remove(app)
            .map_err(|e| Error::Cache(e.to_string()))?;
        self.inventories
            .remove(app)
            .map_err(|e| Error::Cache(e.to_string()))?;
        flush(&self.db).await?;
        if let Some(mirror) = &self.mirror {
            mirror.delete(app).await?;
        }
        Ok(())
    }

    /// Apps with a cached bundle. A cache that cannot be listed is an error, never "no apps".
    pub fn apps(&self) -> Result<Vec<String>> {
        self.bundles
            .iter()
            .keys()
            .map(|k| {
                k.map(|k| String::from_utf8_lossy(&k).into_owned())
                    .map_err(|e| Error::Cache(format!("listing the bundle cache: {e}")))
            })
            .collect()
    }
}

/// Makes the cache's writes durable. A blocking flush on tokio's blocking pool, not `flush_async`,
/// which can exhaust sled's own pool under concurrent flushes (see the hub's store).
async fn flush(db: &sled::Db) -> Result<()> {
    let db = db.clone();
    tokio::task::spawn_blocking(move || db.flush())
        .await
        .map_err(|e| Error::Cache(format!("flush task failed: {e}")))?
        .map_err(|e| Error::Cache(e.to_string()))?;
    Ok(())
}

fn configmap_name(app: &str) -> String {
    format!("flotilla-inventory-{app}")
}

/// Reads the in-cluster inventory of `app` (empty when there is none).
pub async fn read(client: &kube::Client, app: &str) -> Result<Option<Inventory>> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let Some(cm) = api
        .get_opt(&configmap_name(app))
        .await
        .map_err(|e| Error::kube("reading the inventory", e))?
    else {
        return Ok(None);
    };
    // The agent always writes `objects`: an inventory without it (a hand edit) is not "nothing
    // to prune" but unknown, so the pass stops rather than forget what the app owns.
    let data = cm.data.unwrap_or_default();
    let text = data.get("objects").ok_or_else(|| {
        Error::Cache(format!(
            "inventory ConfigMap {AGENT_NAMESPACE}/{} has no `objects` key",
            configmap_name(app)
        ))
    })?;
    let objects = serde_json::from_str(text)
        .map_err(|e| Error::Cache(format!("inventory ConfigMap of {app}: {e}")))?;
    Ok(Some(Inventory {
        digest: data.get("digest").cloned().unwrap_or_default(),
        objects,
        hooks_synced: data.get("hooksSynced").filter(|d| !d.is_empty()).cloned(),
        sync_request: data
            .get("syncRequest")
            .map(|n| {
                n.parse().map_err(|e| {
                    Error::Cache(format!(
                        "inventory ConfigMap of {app}: syncRequest {n:?}: {e}"
                    ))
                })
            })
            .transpose()?
            .unwrap_or(0),
        // Written by every agent that runs hooks; absent only in inventories from before hooks
        // were tracked, which left none on record.
        hooks: data
            .get("hooks")
            .map(|text| {
                serde_json::from_str(text)
                    .map_err(|e| Error::Cache(format!("inventory ConfigMap of {app}: hooks: {e}")))
            })
            .transpose()?
            .unwrap_or_default(),
    }))
}

/// Creates the namespace the agent keeps its own state in, unless it exists.
pub(crate) async fn ensure_namespace(client: &kube::Client, name: &str) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    match namespaces.patch(name, &pp, &Patch::Apply(&ns)).await {
        Ok(_) => Ok(()),
        // A least-privilege install may not write namespaces; it created this one itself.
        Err(kube::Error::Api(s)) if s.code == 403 => Ok(()),
        Err(e) => Err(Error::kube(&format!("creating namespace {name}"), e)),
    }
}

/// Deletes the in-cluster inventory of `app` (the app was removed and its objects pruned).
pub async fn delete(client: &kube::Client, app: &str) -> Result<()> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    match api
        .delete(&configmap_name(app), &kube::api::DeleteParams::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(Error::kube("deleting the inventory", e)),
    }
}

/// Writes the in-cluster inventory of `app` (creating the agent namespace when needed).
pub async fn write(client: &kube::Client, app: &str, inv: &Inventory) -> Result<()> {
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    ensure_namespace(client, AGENT_NAMESPACE).await?;
    let objects = serde_json::to_string(&inv.objects).map_err(|e| Error::Cache(e.to_string()))?;
    let hooks = serde_json::to_string(&inv.hooks).map_err(|e| Error::Cache(e.to_string()))?;
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": configmap_name(app), "namespace": AGENT_NAMESPACE,
                     "labels": {"app.flotilla.dev/inventory": app}},
        "data": {"app": app, "digest": inv.digest, "objects": objects,
                 "hooksSynced": inv.hooks_synced.clone().unwrap_or_default(),
                 "syncRequest": inv.sync_request.to_string(), "hooks": hooks}});
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    api.patch(&configmap_name(app), &pp, &Patch::Apply(&cm))
        .await
        .map_err(|e| Error::kube("writing the inventory", e))?;
    Ok(())
}
