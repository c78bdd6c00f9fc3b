//! Who a committed write concerns, and waking only them: each agent session waits on its own
//! cluster's signal, the rollout controller on the set of apps that changed. A change to one
//! cluster of one app costs one session's wake-up, not the fleet's.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, watch};

/// The clusters a write may have changed the orders of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Touched {
    /// These clusters' orders from the app changed (what `reports::orders_for` reads of their slots).
    Clusters(BTreeSet<String>),
    /// Something every cluster's orders depend on (an app's document or render generation, a
    /// deleted or unreadable app): every session looks again.
    Everyone,
}

impl Touched {
    pub fn is_nothing(&self) -> bool {
        matches!(self, Self::Clusters(c) if c.is_empty())
    }
}

/// The hub's wake-up registry.
#[derive(Default)]
pub struct Wakeups {
    /// Cluster → its sessions' signal (bumped per wake-up); present while a session listens.
    sessions: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// Apps whose rollout inputs changed since the controller last looked.
    dirty: Mutex<BTreeSet<String>>,
    kick: Notify,
}

/// A session's subscription to its cluster's wake-ups; it leaves the registry when dropped.
pub struct Subscription {
    wakeups: Arc<Wakeups>,
    cluster: String,
    pub rx: watch::Receiver<u64>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is one map or set operation: a poisoned lock still holds sound data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Wakeups {
    /// Listens for `cluster`'s wake-ups (several sessions of one cluster share its signal).
    pub fn subscribe(self: &Arc<Self>, cluster: &str) -> Subscription {
        let rx = locked(&self.sessions)
            .entry(cluster.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        Subscription {
            wakeups: Arc::clone(self),
            cluster: cluster.to_string(),
            rx,
        }
    }

    /// Wakes the sessions a write touched.
    pub fn wake(&self, touched: &Touched) {
        let sessions = locked(&self.sessions);
        match touched {
            Touched::Everyone => sessions.values().for_each(bump),
            Touched::Clusters(clusters) => clusters
                .iter()
                .filter_map(|c| sessions.get(c))
                .for_each(bump),
        }
    }

    /// Marks an app for the rollout controller to plan again, and wakes it.
    pub fn app_changed(&self, app: &str) {
        locked(&self.dirty).insert(app.to_string());
        self.kick.notify_one();
    }

    /// The apps marked since the last call.
    pub fn take_dirty(&self) -> BTreeSet<String> {
        std::mem::take(&mut *locked(&self.dirty))
    }

    /// Returns once an app was marked (at once if one was marked since the last wait).
    pub async fn dirtied(&self) {
        self.kick.notified().await
    }

    /// Number of clusters with a listening session.
    #[cfg(test)]
    fn listening(&self) -> usize {
        locked(&self.sessions).len()
    }
}

fn bump(tx: &watch::Sender<u64>) {
    tx.send_modify(|v| *v = v.wrapping_add(1));
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut sessions = locked(&self.wakeups.sessions);
        // This subscription's receiver is still alive here: it is the last one at count 1.
        if sessions
            .get(&self.cluster)
            .is_some_and(|tx| tx.receiver_count() <= 1)
        {
            sessions.remove(&self.cluster);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clusters(names: &[&str]) -> Touched {
        Touched::Clusters(names.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn a_write_wakes_only_the_sessions_it_touched() {
        let w = Arc::new(Wakeups::default());
        let mut a = w.subscribe("a");
        let mut b = w.subscribe("b");
        w.wake(&clusters(&["a", "gone"]));
        assert!(a.rx.has_changed().unwrap());
        assert!(!b.rx.has_changed().unwrap());
        a.rx.mark_unchanged();
        w.wake(&Touched::Everyone);
        assert!(a.rx.has_changed().unwrap() && b.rx.has_changed().unwrap());
        b.rx.mark_unchanged();
        w.wake(&clusters(&[]));
        assert!(!b.rx.has_changed().unwrap());
    }

    #[test]
    fn the_registry_forgets_a_cluster_when_its_last_session_leaves() {
        let w = Arc::new(Wakeups::default());
        let first = w.subscribe("a");
        let second = w.subscribe("a");
        drop(first);
        assert_eq!(w.listening(), 1, "one session of a still listens");
        w.wake(&clusters(&["a"]));
        assert!(second.rx.has_changed().unwrap());
        drop(second);
        assert_eq!(w.listening(), 0);
    }

    #[test]
    fn dirty_apps_are_taken_once() {
        let w = Wakeups::default();
        w.app_changed("web");
        w.app_changed("web");
        w.app_changed("db");
        assert_eq!(w.take_dirty().len(), 2);
        assert!(w.take_dirty().is_empty());
    }
}
