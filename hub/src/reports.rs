//! What agents report: per cluster × app, the revision and digest applied, sync, health and drift.
//! Kept in memory for reads and written through to sled (best effort: a report is re-sent by the
//! agent on its next session, so nothing acknowledged is lost).

use std::collections::BTreeMap;
use std::sync::Mutex;

use flotilla_proto::v1::{AppStatus, Assignment, FleetStatusRow};
use prost::Message;

use crate::Result;
use crate::appstore::AppRecord;

/// Reports by (cluster, app).
pub struct Reports {
    tree: sled::Tree,
    latest: Mutex<BTreeMap<(String, String), AppStatus>>,
}

fn key(cluster: &str, app: &str) -> String {
    format!("{cluster}/{app}")
}

impl Reports {
    pub fn open(db: &sled::Db) -> Result<Self> {
        let tree = db.open_tree("reports")?;
        let mut latest = BTreeMap::new();
        for entry in tree.iter() {
            let (k, v) = entry?;
            let Some((cluster, app)) = std::str::from_utf8(&k).ok().and_then(|k| k.split_once('/'))
            else {
                continue;
            };
            if let Ok(status) = AppStatus::decode(&v[..]) {
                latest.insert((cluster.to_string(), app.to_string()), status);
            }
        }
        Ok(Self {
            tree,
            latest: Mutex::new(latest),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), AppStatus>> {
        // Each critical section is a single map operation: a poisoned lock still holds sound data.
        self.latest.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a report from `cluster` (the identity of the session, never a field of the report).
    pub fn record(&self, cluster: &str, status: AppStatus) {
        let k = key(cluster, &status.app);
        if status.removed {
            let _ = self.tree.remove(k.as_bytes());
            self.lock().remove(&(cluster.to_string(), status.app));
            return;
        }
        let _ = self.tree.insert(k.as_bytes(), status.encode_to_vec());
        self.lock()
            .insert((cluster.to_string(), status.app.clone()), status);
    }

    /// Forgets a cluster (deregistered).
    pub fn forget_cluster(&self, cluster: &str) {
        self.lock().retain(|(c, _), _| c != cluster);
        for k in self
            .tree
            .scan_prefix(format!("{cluster}/").as_bytes())
            .keys()
            .flatten()
        {
            let _ = self.tree.remove(k);
        }
    }

    pub fn get(&self, cluster: &str, app: &str) -> Option<AppStatus> {
        self.lock()
            .get(&(cluster.to_string(), app.to_string()))
            .cloned()
    }
}

/// The assignments of one cluster: every app whose current render assigns it a bundle.
pub fn assignments_for(cluster: &str, apps: &[AppRecord]) -> Vec<Assignment> {
    apps.iter()
        .filter_map(|a| {
            let assigned = a.status.assignments.get(cluster)?;
            Some(Assignment {
                app: a.doc.metadata.name.clone(),
                digest: assigned.digest.clone(),
                revision: assigned.revision.clone(),
                namespace: a.doc.spec.namespace.clone(),
                prune: a.doc.spec.sync_policy.prune,
                self_heal: a.doc.spec.sync_policy.self_heal,
                allow_empty: a.doc.spec.sync_policy.allow_empty,
            })
        })
        .collect()
}

/// One fleet-status row: the hub's desire next to the cluster's report. A cluster that is not
/// connected is Unknown, whatever it last said: stale Healthy is never shown.
pub fn row(
    cluster: &str,
    connected: bool,
    desired: &Assignment,
    report: Option<&AppStatus>,
) -> FleetStatusRow {
    let mut row = FleetStatusRow {
        cluster: cluster.to_string(),
        app: desired.app.clone(),
        connected,
        desired_revision: desired.revision.clone(),
        desired_digest: desired.digest.clone(),
        sync: "Unknown".into(),
        health: "Unknown".into(),
        ..FleetStatusRow::default()
    };
    let Some(report) = report else {
        row.message = if connected {
            "not reported yet".into()
        } else {
            "cluster not connected".into()
        };
        return row;
    };
    row.revision = report.revision.clone();
    row.digest = report.digest.clone();
    row.drift_count = report.drift_count;
    row.reported_at_unix_ms = report.at_unix_ms;
    if !connected {
        row.message = format!(
            "cluster not connected; last reported {} / {}",
            report.sync, report.health
        );
        return row;
    }
    row.health = report.health.clone();
    row.message = report.message.clone();
    row.sync = if report.digest != desired.digest {
        "OutOfSync".into()
    } else {
        report.sync.clone()
    };
    if report.digest != desired.digest && row.message.is_empty() {
        row.message = "applying the new revision".into();
    }
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired() -> Assignment {
        Assignment {
            app: "web".into(),
            digest: "sha256:new".into(),
            revision: "r2".into(),
            ..Assignment::default()
        }
    }

    #[test]
    fn rows_never_show_stale_health() {
        let healthy = AppStatus {
            app: "web".into(),
            digest: "sha256:new".into(),
            sync: "Synced".into(),
            health: "Healthy".into(),
            ..AppStatus::default()
        };
        let r = row("a", true, &desired(), Some(&healthy));
        assert_eq!((r.sync.as_str(), r.health.as_str()), ("Synced", "Healthy"));
        let r = row("a", false, &desired(), Some(&healthy));
        assert_eq!((r.sync.as_str(), r.health.as_str()), ("Unknown", "Unknown"));
        let old = AppStatus {
            digest: "sha256:old".into(),
            ..healthy
        };
        let r = row("a", true, &desired(), Some(&old));
        assert_eq!(r.sync, "OutOfSync");
        let r = row("a", true, &desired(), None);
        assert_eq!(r.health, "Unknown");
    }
}
