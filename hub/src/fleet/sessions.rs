//! Live agent sessions: who is connected, when each cluster was last heard from, and the handle to
//! drop a cluster's streams when it is deregistered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

struct Entry {
    id: u64,
    cancel: CancellationToken,
    /// When the stream opened (ms since the epoch).
    opened_ms: i64,
}

#[derive(Default)]
struct Inner {
    live: HashMap<String, Vec<Entry>>,
    last_seen_ms: HashMap<String, i64>,
}

/// Registry of the hub's open agent streams.
#[derive(Default)]
pub struct Sessions {
    inner: Mutex<Inner>,
    next_id: AtomicU64,
}

/// One open stream; removing itself from the registry when dropped.
pub struct Session {
    sessions: Arc<Sessions>,
    cluster: String,
    id: u64,
    /// Cancelled when the hub wants this stream gone (revocation or shutdown).
    pub cancel: CancellationToken,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The maps stay consistent under a panic elsewhere (each update is a single insert/remove).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new stream for `cluster`, cancelled with `parent` (the hub's shutdown token).
    pub fn open(
        self: &Arc<Self>,
        cluster: &str,
        parent: &CancellationToken,
        now_ms: i64,
    ) -> Session {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel = parent.child_token();
        let mut inner = self.lock();
        inner
            .live
            .entry(cluster.to_string())
            .or_default()
            .push(Entry {
                id,
                cancel: cancel.clone(),
                opened_ms: now_ms,
            });
        inner.last_seen_ms.insert(cluster.to_string(), now_ms);
        drop(inner);
        Session {
            sessions: Arc::clone(self),
            cluster: cluster.to_string(),
            id,
            cancel,
        }
    }

    /// Notes that `cluster` was heard from.
    pub fn touch(&self, cluster: &str, now_ms: i64) {
        self.lock().last_seen_ms.insert(cluster.to_string(), now_ms);
    }

    /// Drops every stream of `cluster`; returns how many were open.
    pub fn drop_cluster(&self, cluster: &str) -> usize {
        let entries = self.lock().live.remove(cluster).unwrap_or_default();
        for entry in &entries {
            entry.cancel.cancel();
        }
        entries.len()
    }

    /// Whether `cluster` has an open stream, and when it was last heard from (ms, if this hub knows).
    pub fn status(&self, cluster: &str) -> (bool, Option<i64>) {
        let inner = self.lock();
        let connected = inner.live.get(cluster).is_some_and(|v| !v.is_empty());
        (connected, inner.last_seen_ms.get(cluster).copied())
    }

    /// Since when (ms) each of `clusters` has had an open stream — the oldest of its open
    /// streams, as a renewal opens the new one before closing the old — under one lock; `None`
    /// when it has none.
    pub fn connected_since<'a>(&self, clusters: impl Iterator<Item = &'a str>) -> Vec<Option<i64>> {
        let inner = self.lock();
        clusters
            .map(|c| {
                inner
                    .live
                    .get(c)
                    .and_then(|v| v.iter().map(|e| e.opened_ms).min())
            })
            .collect()
    }

    /// Number of open streams.
    pub fn connected_count(&self) -> usize {
        self.lock().live.values().map(Vec::len).sum()
    }
}

impl Session {
    pub fn cluster(&self) -> &str {
        &self.cluster
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let mut inner = self.sessions.lock();
        if let Some(entries) = inner.live.get_mut(&self.cluster) {
            entries.retain(|e| e.id != self.id);
            if entries.is_empty() {
                inner.live.remove(&self.cluster);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_track_connection_and_drop_on_revocation() {
        let sessions = Arc::new(Sessions::default());
        let root = CancellationToken::new();
        let a1 = sessions.open("a", &root, 1);
        let a2 = sessions.open("a", &root, 2);
        assert_eq!(sessions.status("a"), (true, Some(2)));
        drop(a1);
        assert!(sessions.status("a").0);
        assert_eq!(sessions.drop_cluster("a"), 1);
        assert!(a2.cancel.is_cancelled());
        assert_eq!(sessions.status("a"), (false, Some(2)));
        drop(a2);
        assert_eq!(sessions.connected_count(), 0);
    }
}
