//! What agents report: per cluster × app, the revision and digest applied, sync, health and drift.
//! Kept in memory for reads and written to sled when what a rollout decides on changes, else at
//! most every 30 s (best effort: a report is re-sent by the agent on its next session, so nothing
//! acknowledged is lost).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use flotilla_proto::v1::{
    AppStatus, Assignment, Assignments, FleetStatusRow, HealthStatus, HeldApp, SyncStatus,
};
use prost::Message;

use crate::Result;
use crate::db::appstore::{AppRecord, Catalog};

/// How often an unchanged report is written through to sled at most: reports that only refresh
/// their time or message live in memory, so a chatty agent costs no disk.
const PERSIST_UNCHANGED_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// The latest report of one cluster × app, and when (and as what) it was last persisted.
struct Latest {
    status: AppStatus,
    persisted_at: std::time::Instant,
    persisted: (String, i32, i32),
}

fn decision(status: &AppStatus) -> (String, i32, i32) {
    (status.digest.clone(), status.sync, status.health)
}

/// Reports by (cluster, app).
pub struct Reports {
    tree: sled::Tree,
    latest: Mutex<BTreeMap<(String, String), Latest>>,
}

fn key(cluster: &str, app: &str) -> String {
    format!("{cluster}/{app}")
}

impl Reports {
    pub fn open(db: &sled::Db) -> Result<Self> {
        let tree = db.open_tree("reports")?;
        let mut latest = BTreeMap::new();
        let now = std::time::Instant::now();
        for entry in tree.iter() {
            let (k, v) = entry?;
            let Some((cluster, app)) = std::str::from_utf8(&k).ok().and_then(|k| k.split_once('/'))
            else {
                // Not a key this hub writes; the cluster re-sends its reports on its next session.
                tracing::warn!(key = %String::from_utf8_lossy(&k), "ignoring a malformed report key");
                continue;
            };
            let decoded = AppStatus::decode(&v[..]);
            if let Err(e) = &decoded {
                tracing::warn!(cluster, app, error = %e, "ignoring an undecodable stored report; the cluster reports again");
            }
            if let Ok(status) = decoded {
                let persisted = decision(&status);
                latest.insert(
                    (cluster.to_string(), app.to_string()),
                    Latest {
                        status,
                        persisted_at: now,
                        persisted,
                    },
                );
            }
        }
        Ok(Self {
            tree,
            latest: Mutex::new(latest),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), Latest>> {
        // Each critical section is a single map operation: a poisoned lock still holds sound data.
        self.latest.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a report from `cluster` (the identity of the session, never a field of the report).
    /// Written through to sled when what a rollout decides on changed, else at most every 30 s.
    /// Records a report; whether it changed what it decides (digest, sync, health): only such a
    /// report can move a rollout.
    pub fn record(&self, cluster: &str, status: AppStatus) -> bool {
        let k = key(cluster, &status.app);
        let map_key = (cluster.to_string(), status.app.clone());
        if status.removed {
            if let Err(e) = self.tree.remove(k.as_bytes()) {
                tracing::warn!(cluster, app = %status.app, error = %e, "forgetting a stored report");
            }
            return self.lock().remove(&map_key).is_some();
        }
        let now = std::time::Instant::now();
        let mut latest = self.lock();
        let persist = latest.get(&map_key).is_none_or(|l| {
            l.persisted != decision(&status)
                || now.duration_since(l.persisted_at) >= PERSIST_UNCHANGED_EVERY
        });
        let decides = latest
            .get(&map_key)
            .is_none_or(|l| decision(&l.status) != decision(&status));
        let entry = latest.entry(map_key).or_insert_with(|| Latest {
            status: status.clone(),
            persisted_at: now,
            persisted: decision(&status),
        });
        // Best effort (the module's rule): the agent re-sends its reports on every session.
        if persist {
            if let Err(e) = self.tree.insert(k.as_bytes(), status.encode_to_vec()) {
                tracing::warn!(cluster, app = %status.app, error = %e, "persisting a report");
            }
            entry.persisted_at = now;
            entry.persisted = decision(&status);
        }
        entry.status = status;
        decides
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
            if let Err(e) = self.tree.remove(k) {
                tracing::warn!(cluster, error = %e, "forgetting a deregistered cluster's report");
            }
        }
    }

    pub fn get(&self, cluster: &str, app: &str) -> Option<AppStatus> {
        self.lock()
            .get(&(cluster.to_string(), app.to_string()))
            .map(|l| l.status.clone())
    }

    /// What each of `clusters` last reported of `app`, as rollouts read it, under one lock (a
    /// planning round asks for the whole fleet at once; no report's diff or hooks are copied).
    pub fn observed<'a>(
        &self,
        app: &str,
        clusters: impl Iterator<Item = &'a str>,
    ) -> Vec<Option<flotilla_proto::status::Observed>> {
        let latest = self.lock();
        let mut key = (String::new(), app.to_string());
        clusters
            .map(|c| {
                c.clone_into(&mut key.0);
                latest
                    .get(&key)
                    .map(|l| flotilla_proto::status::Observed::of(&l.status))
            })
            .collect()
    }
}

/// Everything one cluster is told: its assignments, the apps it must prune (only where the hub read
/// the app and the app positively leaves it, or was deleted), and the apps held because their
/// record does not read. Pure.
pub fn orders_for(cluster: &str, catalog: &Catalog) -> Assignments {
    let removed = catalog
        .apps
        .iter()
        .filter(|a| leaves(a, cluster))
        .map(|a| a.doc.metadata.name.clone())
        .chain(
            catalog
                .deleted
                .iter()
                .filter(|name| {
                    !catalog.is_unreadable(name)
                        && !catalog.apps.iter().any(|a| &a.doc.metadata.name == *name)
                })
                .cloned(),
        )
        .collect();
    Assignments {
        apps: assignments_for(cluster, &catalog.apps),
        removed,
        held: catalog
            .unreadable
            .iter()
            .map(|u| HeldApp {
                app: u.name.clone(),
                reason: u.error.clone(),
            })
            .collect(),
    }
}

/// Whether an app's record says `cluster` is not its own: rendered at its current generation (a
/// document not rendered yet decides nothing), and neither targeting nor assigning the cluster.
fn leaves(a: &AppRecord, cluster: &str) -> bool {
    let s = &a.status;
    s.revision.is_some()
        && s.observed_generation == a.generation
        && !s.target.contains_key(cluster)
        && !s.assignments.contains_key(cluster)
}

/// The assignments of one cluster: every app whose current render assigns it a bundle, and (for
/// manual apps) every app git wants on it that no sync has brought there yet. Where git wants
/// another bundle than the one assigned, it rides along as the preview, so the agent can report
/// what the next sync would change.
pub fn assignments_for(cluster: &str, apps: &[Arc<AppRecord>]) -> Vec<Assignment> {
    apps.iter()
        .filter_map(|a| {
            let policy = &a.doc.spec.sync_policy;
            let assigned = a.status.assignments.get(cluster);
            let target = a.status.target.get(cluster);
            // What git wants, when the cluster is not told to run it yet: a manual app's pending
            // sync, or a cluster an automated app's rollout has not reached. The agent diffs it
            // (`app diff`) and never applies it.
            let preview = match (assigned, target) {
                (_, Some(t)) if assigned.map(|x| &x.digest) != Some(&t.digest) => Some(t),
                _ => None,
            };
            if assigned.is_none() && (policy.automated || preview.is_none()) {
                // An automated app reaches a cluster only through its rollout: nothing yet.
                return None;
            }
            let (digest, revision) = assigned
                .map(|x| (x.digest.clone(), x.revision.clone()))
                .unwrap_or_default();
            // A request is carried to the agent only once the rollout gave the cluster its bundle.
            let sync_request = a
                .status
                .sync_requests
                .get(cluster)
                .filter(|r| !digest.is_empty() && r.digest == digest)
                .map_or(0, |r| r.id);
            Some(Assignment {
                app: a.doc.metadata.name.clone(),
                digest,
                revision,
                namespace: a.doc.spec.namespace.clone(),
                prune: policy.prune,
                self_heal: policy.self_heal,
                allow_empty: policy.allow_empty,
                create_namespace: policy.create_namespace,
                manual: !policy.automated,
                sync_request,
                preview_digest: preview.map(|t| t.digest.clone()).unwrap_or_default(),
            })
        })
        .collect()
}

/// Why an app reaches no cluster at all, in words; `None` when some cluster is targeted. Shown by
/// `app get` and as the app's one row in `flotilla status`, so an app never silently vanishes.
pub fn unreached(record: &AppRecord) -> Option<String> {
    let s = &record.status;
    if s.revision.is_none() {
        return Some(match &s.last_error {
            Some(e) => format!("never rendered: {e}"),
            None => "not rendered yet".into(),
        });
    }
    if !s.target.is_empty() || !s.assignments.is_empty() {
        return None;
    }
    let t = &record.doc.spec.targets;
    let mut what = Vec::new();
    if let Some(sel) = &t.selector {
        // A selector is strings all the way down: JSON encoding cannot fail; Debug if it ever did.
        let text = serde_json::to_string(sel).unwrap_or_else(|_| format!("{sel:?}"));
        what.push(format!("selector {text}"));
    }
    if !t.clusters.is_empty() {
        what.push(format!("clusters [{}]", t.clusters.join(", ")));
    }
    let what = if what.is_empty() {
        "it names no targets".to_string()
    } else {
        what.join(" and ")
    };
    let mut note = format!("its targets select no registered cluster ({what})");
    if let Some(e) = &s.last_error {
        note.push_str(&format!("; last render failed: {e}"));
    }
    Some(note)
}

/// The row of an app that reaches no cluster: no cluster, Unknown, and why.
pub fn unreached_row(app: &str, note: String) -> FleetStatusRow {
    FleetStatusRow {
        app: app.to_string(),
        sync: SyncStatus::Unknown.into(),
        health: HealthStatus::Unknown.into(),
        message: note,
        ..FleetStatusRow::default()
    }
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
        sync: SyncStatus::Unknown.into(),
        health: HealthStatus::Unknown.into(),
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
            report.sync(),
            report.health()
        );
        return row;
    }
    row.health = report.health;
    row.message = report.message.clone();
    row.sync = if report.digest != desired.digest {
        SyncStatus::OutOfSync.into()
    } else {
        report.sync
    };
    if report.digest != desired.digest && row.message.is_empty() {
        row.message = "applying the new revision".into();
    }
    row
}

/// The fleet-status row of `app` on `cluster`: what git wants it to run (its target) next to
/// what it reports. A cluster the rollout has not moved to its target yet is OutOfSync (it runs
/// an older bundle, whatever it says of that one), saying what it waits for; its REVISION is the
/// revision it runs. `desired` is what the cluster is told ([`assignments_for`]); `None` for a
/// cluster the rollout has given nothing yet. Returns `None` where the app has no business.
pub fn status_row(
    cluster: &str,
    connected: bool,
    app: &AppRecord,
    desired: Option<&Assignment>,
    report: Option<&AppStatus>,
) -> Option<FleetStatusRow> {
    let target = app.status.target.get(cluster);
    if target.is_none() && desired.is_none() {
        return None;
    }
    let told = desired.cloned().unwrap_or_else(|| Assignment {
        app: app.doc.metadata.name.clone(),
        ..Assignment::default()
    });
    let mut row = row(cluster, connected, &told, report);
    // A cluster no longer targeted is being removed: its row is what it is told.
    let Some(target) = target else {
        return Some(row);
    };
    row.desired_revision = target.revision.clone();
    row.desired_digest = target.digest.clone();
    // The revision is the hub's word for the digest the cluster reports (a commit that left its
    // bundle as it was is still the revision it runs); the agent's own claim only when the digest
    // is neither what git wants nor what it was told (the table then shows the digest too).
    if let Some(r) = report {
        if r.digest == target.digest {
            row.revision = target.revision.clone();
        } else if let Some(t) = desired.filter(|t| t.digest == r.digest) {
            row.revision = t.revision.clone();
        }
    }
    let reached = app
        .status
        .assignments
        .get(cluster)
        .is_some_and(|a| a.digest == target.digest);
    if reached {
        return Some(row);
    }
    let why = waiting_note(app, cluster);
    match report {
        Some(_) if connected => {
            row.sync = SyncStatus::OutOfSync.into();
            row.message = if row.message.is_empty() {
                why
            } else {
                format!("{why}; {}", row.message)
            };
        }
        // Given nothing yet: none of the bundle is there.
        None if connected => {
            row.sync = SyncStatus::OutOfSync.into();
            row.message = why;
        }
        // Not connected: Unknown, and its own message says so.
        _ => {}
    }
    Some(row)
}

/// Why the rollout has not given `cluster` its target bundle yet, in words.
fn waiting_note(app: &AppRecord, cluster: &str) -> String {
    use crate::rollout::{ClusterState, Phase};
    let Some(r) = &app.status.rollout else {
        return "waiting for its rollout to start".into();
    };
    let Some(c) = r.clusters.get(cluster) else {
        return format!("waiting for the rollout of revision {}", r.revision);
    };
    let step = r
        .steps
        .get(c.step)
        .map_or_else(String::new, |s| format!(" ({s})"));
    let paused = match (r.phase, r.paused) {
        (Phase::Paused, Some(why)) => format!(", rollout paused ({why:?})"),
        (Phase::Paused, None) => ", rollout paused".into(),
        _ => String::new(),
    };
    let reason = if c.reason.is_empty() {
        String::new()
    } else {
        format!(": {}", c.reason)
    };
    if matches!(r.phase, Phase::RolledBack | Phase::Failed) {
        // Not waiting: the revision was rolled back, and stays so until a newer render.
        return format!(
            "revision {} was rolled back ({}); runs its earlier revision until the next commit",
            r.revision, r.message
        );
    }
    match c.state {
        ClusterState::Pending => format!(
            "waiting for rollout step {}{step}{paused}{reason}",
            c.step + 1
        ),
        ClusterState::Skipped => {
            format!("skipped by the rollout{reason}; catches up when it succeeds")
        }
        ClusterState::RolledBack => format!("rolled back to its earlier revision{reason}"),
        state => format!("rollout: {state:?}{reason}"),
    }
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

    fn record(name: &str, generation: u64, rendered_at: Option<u64>, on: &[&str]) -> AppRecord {
        let doc = crate::apps::AppDocument::parse(&format!(
            "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: {name}}}\nspec:\n  source: {{repoURL: \"file:///r\"}}\n  targets: {{clusters: [a, b]}}\n"
        ))
        .unwrap();
        let mut status = crate::db::appstore::AppStatus::default();
        if let Some(g) = rendered_at {
            status.revision = Some("r1".into());
            status.observed_generation = g;
        }
        for c in on {
            let to = crate::rollout::Assigned {
                digest: "d".into(),
                revision: "r1".into(),
            };
            status.target.insert(c.to_string(), to.clone());
            status.assignments.insert(c.to_string(), to);
        }
        AppRecord {
            doc,
            origin: crate::apps::Origin::Api,
            generation,
            status,
        }
    }

    #[test]
    fn every_targeted_cluster_has_a_row_and_unreached_ones_read_out_of_sync() {
        use crate::rollout::{Assigned, ClusterRollout, ClusterState, PauseReason, Phase};
        let at = |d: &str, r: &str| Assigned {
            digest: d.into(),
            revision: r.into(),
        };
        let mut app = record("web", 1, Some(1), &[]);
        let s = &mut app.status;
        for c in ["moved", "held", "new"] {
            s.target.insert(c.into(), at("d2", "r2"));
        }
        s.assignments.insert("moved".into(), at("d2", "r2"));
        s.assignments.insert("held".into(), at("d1", "r1"));
        s.target.insert("same".into(), at("d1", "r3"));
        s.assignments.insert("same".into(), at("d1", "r1"));
        let mut rollout: crate::rollout::Rollout = serde_json::from_value(serde_json::json!({
            "id": 1, "revision": "r2", "generation": 1, "phase": "Paused", "current_step": 0,
            "steps": ["canary", "rest"], "step_healthy_since": null, "paused": "Step",
            "promote": false, "tolerated_failures": 0, "message": "", "clusters": {},
            "started_at": 0, "finished_at": null, "max_updating": 0
        }))
        .unwrap();
        for (c, step) in [("moved", 0), ("held", 1), ("new", 1)] {
            rollout.clusters.insert(
                c.into(),
                ClusterRollout {
                    step,
                    from: None,
                    to: at("d2", "r2"),
                    state: if step == 0 {
                        ClusterState::Healthy
                    } else {
                        ClusterState::Pending
                    },
                    since: 0,
                    reason: String::new(),
                },
            );
        }
        assert_eq!(rollout.paused, Some(PauseReason::Step));
        assert_eq!(rollout.phase, Phase::Paused);
        app.status.rollout = Some(rollout);
        let report = |d: &str, r: &str| AppStatus {
            app: "web".into(),
            digest: d.into(),
            revision: r.into(),
            sync: SyncStatus::Synced.into(),
            health: HealthStatus::Healthy.into(),
            ..AppStatus::default()
        };
        let told = |d: &str, r: &str| Assignment {
            app: "web".into(),
            digest: d.into(),
            revision: r.into(),
            ..Assignment::default()
        };
        // (cluster, told, report) → (sync, revision shown, message contains)
        let table = [
            (
                "moved",
                Some(told("d2", "r2")),
                Some(report("d2", "r2")),
                SyncStatus::Synced,
                "r2",
                "",
            ),
            (
                "held",
                Some(told("d1", "r1")),
                Some(report("d1", "r1")),
                SyncStatus::OutOfSync,
                "r1",
                "waiting for rollout step 2 (rest), rollout paused (Step)",
            ),
            (
                "new",
                None,
                None,
                SyncStatus::OutOfSync,
                "",
                "waiting for rollout step 2 (rest)",
            ),
            // Its bundle did not change in r3: it runs r3.
            (
                "same",
                Some(told("d1", "r1")),
                Some(report("d1", "r1")),
                SyncStatus::Synced,
                "r3",
                "",
            ),
        ];
        for (cluster, told, report, sync, revision, message) in table {
            let row = status_row(cluster, true, &app, told.as_ref(), report.as_ref())
                .unwrap_or_else(|| panic!("{cluster} has a row"));
            assert_eq!(row.sync(), sync, "{cluster}: {row:?}");
            assert_eq!(row.revision, revision, "{cluster}");
            assert!(row.message.contains(message), "{cluster}: {}", row.message);
            assert_eq!(row.desired_digest, app.status.target[cluster].digest);
        }
        assert!(status_row("elsewhere", true, &app, None, None).is_none());
    }

    #[test]
    fn only_a_positive_decision_removes_an_app_from_a_cluster() {
        let catalog = Catalog {
            apps: vec![
                record("on-a", 1, Some(1), &["a"]).into(),
                // A document not rendered at its generation decides nothing.
                record("stale", 2, Some(1), &[]).into(),
                record("never", 1, None, &[]).into(),
                record("nowhere", 1, Some(1), &[]).into(),
            ],
            unreadable: vec![crate::db::appstore::UnreadableApp {
                name: "broken".into(),
                error: "does not decode".into(),
            }],
            // Deleted, then one created again and one unreadable: neither is a removal.
            deleted: vec!["gone".into(), "on-a".into(), "broken".into()],
        };
        let cases: &[(&str, &[&str], &[&str])] = &[
            ("a", &["on-a"], &["nowhere", "gone"]),
            ("b", &[], &["on-a", "nowhere", "gone"]),
        ];
        for (cluster, apps, removed) in cases {
            let o = orders_for(cluster, &catalog);
            let names: Vec<&str> = o.apps.iter().map(|a| a.app.as_str()).collect();
            assert_eq!(&names, apps, "{cluster}: assigned");
            assert_eq!(&o.removed, removed, "{cluster}: removed");
            assert_eq!(o.held.len(), 1, "{cluster}: held");
            assert_eq!(o.held[0].app, "broken");
        }
        // A store that read nothing at all removes nothing.
        let empty = orders_for("a", &Catalog::default());
        assert!(empty.apps.is_empty() && empty.removed.is_empty() && empty.held.is_empty());
    }

    #[test]
    fn apps_that_reach_no_cluster_say_why() {
        let doc = crate::apps::AppDocument::parse(
            "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {name: web}\nspec:\n  source: {repoURL: \"file:///r\"}\n  targets: {clusters: [nope]}\n",
        )
        .unwrap();
        let mut record = AppRecord {
            doc,
            origin: crate::apps::Origin::Api,
            generation: 1,
            status: crate::db::appstore::AppStatus::default(),
        };
        assert_eq!(unreached(&record).unwrap(), "not rendered yet");
        record.status.last_error = Some("render: a.yaml line 3: unknown variable".into());
        assert_eq!(
            unreached(&record).unwrap(),
            "never rendered: render: a.yaml line 3: unknown variable"
        );
        record.status.revision = Some("abc".into());
        record.status.last_error = None;
        assert_eq!(
            unreached(&record).unwrap(),
            "its targets select no registered cluster (clusters [nope])"
        );
        record.status.target.insert(
            "eu-1".into(),
            crate::rollout::Assigned {
                digest: "d".into(),
                revision: "abc".into(),
            },
        );
        assert_eq!(unreached(&record), None);
    }

    #[test]
    fn rows_never_show_stale_health() {
        let healthy = AppStatus {
            app: "web".into(),
            digest: "sha256:new".into(),
            sync: SyncStatus::Synced.into(),
            health: HealthStatus::Healthy.into(),
            ..AppStatus::default()
        };
        let r = row("a", true, &desired(), Some(&healthy));
        assert_eq!(
            (r.sync(), r.health()),
            (SyncStatus::Synced, HealthStatus::Healthy)
        );
        let r = row("a", false, &desired(), Some(&healthy));
        assert_eq!(
            (r.sync(), r.health()),
            (SyncStatus::Unknown, HealthStatus::Unknown)
        );
        let old = AppStatus {
            digest: "sha256:old".into(),
            ..healthy.clone()
        };
        let r = row("a", true, &desired(), Some(&old));
        assert_eq!(r.sync(), SyncStatus::OutOfSync);
        let r = row("a", true, &desired(), None);
        assert_eq!(r.health(), HealthStatus::Unknown);
        let failed = AppStatus {
            sync: SyncStatus::Failed.into(),
            health: HealthStatus::Degraded.into(),
            message: "ConfigMap ghost/c: not applied: namespace ghost does not exist".into(),
            ..healthy
        };
        let r = row("a", true, &desired(), Some(&failed));
        assert_eq!(
            (r.sync(), r.health()),
            (SyncStatus::Failed, HealthStatus::Degraded)
        );
        assert!(r.message.contains("ghost"), "{}", r.message);
    }
}
