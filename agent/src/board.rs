//! The statuses of the apps on this cluster, as the session sends them: every change is published
//! (and a fresh time on every attempt), so the hub hears each verdict once and never a stale one.

use std::collections::BTreeMap;
use std::sync::Mutex;

use flotilla_proto::v1::AppStatus;
use tokio::sync::watch;

/// Statuses of the apps on this cluster, for the session to send.
pub struct StatusBoard {
    map: Mutex<BTreeMap<String, AppStatus>>,
    changed: Mutex<BTreeMap<String, AppStatus>>,
    version: watch::Sender<u64>,
}

impl Default for StatusBoard {
    fn default() -> Self {
        Self {
            map: Mutex::new(BTreeMap::new()),
            changed: Mutex::new(BTreeMap::new()),
            version: watch::channel(0).0,
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Single map operations under the lock: a poisoned lock still guards sound data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_ms() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

impl StatusBoard {
    /// Publishes a status when it differs from the last one (ignoring its timestamp).
    pub fn set(&self, mut status: AppStatus) {
        let mut map = lock(&self.map);
        let same = map.get(&status.app).is_some_and(|old| {
            let mut o = old.clone();
            o.at_unix_ms = 0;
            let mut n = status.clone();
            n.at_unix_ms = 0;
            o == n
        });
        if same {
            return;
        }
        status.at_unix_ms = now_ms();
        if status.removed {
            map.remove(&status.app);
        } else {
            map.insert(status.app.clone(), status.clone());
        }
        lock(&self.changed).insert(status.app.clone(), status);
        self.version.send_modify(|v| *v += 1);
    }

    /// Publishes a status with a fresh time even when nothing else changed: every reconcile
    /// attempt says when it was judged, so the hub can tell a live verdict from a stale one.
    pub fn refresh(&self, mut status: AppStatus) {
        status.at_unix_ms = now_ms();
        let mut map = lock(&self.map);
        map.insert(status.app.clone(), status.clone());
        lock(&self.changed).insert(status.app.clone(), status);
        drop(map);
        self.version.send_modify(|v| *v += 1);
    }

    pub fn all(&self) -> Vec<AppStatus> {
        lock(&self.changed).clear();
        lock(&self.map).values().cloned().collect()
    }

    pub fn take_changed(&self) -> Vec<AppStatus> {
        std::mem::take(&mut *lock(&self.changed))
            .into_values()
            .collect()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}
