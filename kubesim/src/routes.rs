//! The clusters one simulator serves and how a request path picks one (`/clusters/<name>/...`; the
//! root path is the first cluster), with the bearer token every request must carry.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use http::HeaderMap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::{Cluster, ClusterSettings};

pub(crate) struct Entry {
    pub(crate) cluster: Arc<Cluster>,
    pub(crate) cancel: CancellationToken,
}

/// State shared by every connection.
pub struct Shared {
    pub(crate) clusters: RwLock<BTreeMap<String, Entry>>,
    pub(crate) first: RwLock<Option<String>>,
    pub(crate) token: String,
    pub(crate) settings: ClusterSettings,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tasks: TaskTracker,
}

impl Shared {
    /// The cluster a path addresses and the rest of the path.
    pub(crate) fn route_cluster(&self, path: &str) -> Option<(Arc<Cluster>, String)> {
        let clusters = self.clusters.read().unwrap_or_else(|p| p.into_inner());
        if let Some(rest) = path.strip_prefix("/clusters/") {
            let (name, rest) = rest.split_once('/').unwrap_or((rest, ""));
            return clusters
                .get(name)
                .map(|e| (Arc::clone(&e.cluster), format!("/{rest}")));
        }
        let first = self
            .first
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        clusters
            .get(&first)
            .map(|e| (Arc::clone(&e.cluster), path.to_string()))
    }

    pub(crate) fn authorized(&self, headers: &HeaderMap) -> bool {
        headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| t == self.token)
    }
}
