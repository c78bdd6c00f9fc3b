//! The rollout controller: the IO edge of the planner. When an app's inputs change (a render, an
//! operator, a report; and twice a second while its rollout is active) it feeds the app's rollout
//! what the fleet reports and persists the planner's decision (flushed before anyone is told;
//! the store then wakes the sessions of the clusters whose assignments moved).
//! Operator actions (pause, resume, promote, abort, rollback) also land here, in the audit log.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::db::appstore::{AppRecord, AppStore};
use crate::db::store::ClusterRecord;
use crate::edge::metrics::Metrics;
use crate::fleet::reports::Reports;
use crate::fleet::sessions::Sessions;
use crate::rollout::{ClusterView, Input, Phase, Rollout};
use crate::{Error, Hub, Result, now_unix};

/// How often active rollouts are re-planned without a change (time moves soaks and deadlines).
const PLAN_INTERVAL: Duration = Duration::from_millis(500);

/// What a planning round reads and writes: the apps, and what the fleet says of its clusters —
/// these few handles rather than the whole hub, so a round runs over an in-memory store in tests.
pub(crate) struct Planning<'a> {
    pub apps: &'a AppStore,
    pub sessions: &'a Sessions,
    pub reports: &'a Reports,
    pub metrics: &'a Metrics,
}

impl<'a> Planning<'a> {
    pub fn of(hub: &'a Hub) -> Self {
        Self {
            apps: &hub.apps,
            sessions: &hub.sessions,
            reports: &hub.reports,
            metrics: &hub.metrics,
        }
    }
}

/// What the planner needs to know about every registered cluster, for one app.
fn views(
    fleet: &Planning<'_>,
    clusters: &[ClusterRecord],
    app: &str,
) -> BTreeMap<String, ClusterView> {
    let names = || clusters.iter().map(|c| c.name.as_str());
    let since = fleet.sessions.connected_since(names());
    let reports = fleet.reports.observed(app, names());
    clusters
        .iter()
        .zip(since)
        .zip(reports)
        .map(|((c, since), report)| {
            let view = ClusterView {
                labels: c.labels.clone(),
                connected: since.is_some(),
                connected_since: since.map(|ms| ms / 1000),
                report,
            };
            (c.name.clone(), view)
        })
        .collect()
}

/// One planning round for `record`: starts a rollout for a new target, advances the current one,
/// and derives assignments. Returns whether assignments changed.
fn plan(record: &mut AppRecord, views: &BTreeMap<String, ClusterView>, now: i64) -> bool {
    let Ok(strategy) = record.doc.strategy() else {
        // Validated on every write; a stored document that no longer resolves waits for a fix.
        return false;
    };
    let s = &mut record.status;
    let Some(revision) = s.revision.clone() else {
        return false;
    };
    let generation = s.observed_generation;
    let before = s.assignments.clone();
    let was = s.rollout.as_ref().map(|r| r.phase);
    let requested: BTreeMap<String, String> = s
        .sync_requests
        .iter()
        .map(|(c, r)| (c.clone(), r.digest.clone()))
        .collect();
    let input = Input {
        app: &record.doc.metadata.name,
        strategy: &strategy,
        target: &s.target,
        current: &s.assignments,
        clusters: views,
        now,
        sync_requests: (!record.doc.spec.sync_policy.automated).then_some(&requested),
    };
    // A new desired state is a new rollout: another revision or document, or, once a rollout
    // is over, the same revision rendered to other bundles for some cluster (its labels
    // changed, say). An active rollout takes such a change in its stride (`Rollout::advance`).
    let superseding = s.rollout.as_ref().is_none_or(|r| {
        r.revision != revision
            || r.generation != generation
            || (!r.phase.is_active()
                && r.clusters
                    .iter()
                    .any(|(name, c)| s.target.get(name).is_some_and(|t| t.digest != c.to.digest)))
    });
    let rollout = if superseding {
        let next = Rollout::start(
            s.next_rollout_id,
            &revision,
            generation,
            &input,
            s.rollout.as_ref(),
        );
        if let Some(old) = &s.rollout
            && old.phase.is_active()
        {
            tracing::info!(app = %record.doc.metadata.name, old = %old.revision, new = %revision, "a newer revision supersedes the active rollout");
        }
        s.next_rollout_id += 1;
        next
    } else {
        // Cannot be None: `superseding` is true then.
        let Some(mut current) = s.rollout.take() else {
            return false;
        };
        current.advance(&input);
        current
    };
    s.assignments = rollout
        .assignments()
        .into_iter()
        .filter_map(|(cluster, a)| Some((cluster, a?)))
        .collect();
    if rollout.phase == Phase::Succeeded && (superseding || was != Some(Phase::Succeeded)) {
        s.stable_revision = Some(rollout.revision.clone());
        if let Some(entry) = s
            .history
            .iter_mut()
            .rev()
            .find(|h| h.revision == rollout.revision)
        {
            entry.rolled_out = true;
        }
    }
    if was != Some(rollout.phase) || superseding {
        tracing::info!(app = %record.doc.metadata.name, revision = %rollout.revision, phase = ?rollout.phase, message = %rollout.message, "rollout");
    }
    s.rollout = Some(rollout);
    s.assignments != before
}

/// Plans one app and persists the outcome.
pub async fn plan_app(hub: &Hub, name: &str) -> Result<()> {
    plan_app_with(&Planning::of(hub), name, &hub.store.clusters()?).await
}

/// [`plan_app`] with the registered clusters already read (once per round for every app).
async fn plan_app_with(fleet: &Planning<'_>, name: &str, clusters: &[ClusterRecord]) -> Result<()> {
    let views = views(fleet, clusters, name);
    let now = now_unix();
    let mut newly = Vec::new();
    fleet
        .apps
        .update_status(name, |record| {
            let before = record.status.assignments.clone();
            plan(record, &views, now);
            for (cluster, a) in &record.status.assignments {
                if before.get(cluster) != Some(a) {
                    newly.push((cluster.clone(), a.digest.clone()));
                }
            }
        })
        .await?;
    for (cluster, digest) in newly {
        fleet.metrics.assigned(&cluster, &digest);
    }
    Ok(())
}

/// How often old tombstones of deleted apps are looked for.
const TOMBSTONE_CHECK: Duration = Duration::from_secs(600);

/// The controller loop; returns at shutdown. It plans an app when something it depends on
/// changed — a write of the app (a render, an operator, its own last step), a report of one of
/// its clusters — and, while its rollout is active, every [`PLAN_INTERVAL`] for what time alone
/// moves (soaks, deadlines, clusters gone quiet). A finished rollout with nothing new costs
/// nothing.
pub async fn run(hub: Arc<Hub>) {
    let mut tick = tokio::time::interval(PLAN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tombstones_checked: Option<tokio::time::Instant> = None;
    loop {
        let timed = tokio::select! {
            _ = hub.shutdown.cancelled() => return,
            _ = tick.tick() => true,
            _ = hub.wake.dirtied() => false,
        };
        let catalog = match hub.apps.list() {
            Ok(catalog) => catalog,
            Err(e) => {
                hub.metrics.store_read_failed("rollouts");
                tracing::error!(error = %e, "listing apps for rollouts");
                continue;
            }
        };
        report_unreadable(&hub, &catalog).await;
        if tombstones_checked.is_none_or(|at| at.elapsed() >= TOMBSTONE_CHECK) {
            tombstones_checked = Some(tokio::time::Instant::now());
            match hub.apps.expire_tombstones() {
                Ok(0) => {}
                Ok(n) => tracing::info!(expired = n, "forgot old tombstones of deleted apps"),
                Err(e) => tracing::warn!(error = %e, "expiring tombstones; next check retries"),
            }
        }
        let mut names = hub.wake.take_dirty();
        if timed {
            names.extend(
                catalog
                    .apps
                    .iter()
                    .filter(|a| due_by_time(a))
                    .map(|a| a.doc.metadata.name.clone()),
            );
        }
        if names.is_empty() {
            continue;
        }
        let clusters = match hub.store.clusters() {
            Ok(clusters) => clusters,
            Err(e) => {
                tracing::error!(error = %e, "listing clusters for rollouts");
                // Planned at the next wake-up instead.
                names.iter().for_each(|n| hub.wake.app_changed(n));
                continue;
            }
        };
        for name in names {
            if let Err(e) = plan_app_with(&Planning::of(&hub), &name, &clusters).await {
                tracing::error!(app = %name, error = %e, "planning the rollout");
            }
        }
    }
}

/// Whether time alone can move an app's rollout: it is active. Pure.
fn due_by_time(app: &AppRecord) -> bool {
    app.status
        .rollout
        .as_ref()
        .is_some_and(|r| r.phase.is_active())
}

/// Unreadable app records: counted, and each audited once (the apps themselves are held by the
/// sessions: `reports::orders_for`).
async fn report_unreadable(hub: &Hub, catalog: &crate::db::appstore::Catalog) {
    hub.metrics
        .unreadable_app_records
        .set(i64::try_from(catalog.unreadable.len()).unwrap_or(i64::MAX));
    for u in hub.apps.unaudited_unreadable() {
        if let Err(e) = hub
            .audit
            .record("hub", "app.unreadable", &format!("app/{}", u.name), u.error)
            .await
        {
            tracing::warn!(app = %u.name, error = %e, "auditing an unreadable app record");
        }
    }
}

/// An operator action on an app's rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pause,
    Resume,
    Promote,
    Abort,
}

impl Action {
    /// The word operators type (`flotilla rollout pause`), and the audit log's.
    pub fn word(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Promote => "promote",
            Self::Abort => "abort",
        }
    }
}

impl std::str::FromStr for Action {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "pause" => Self::Pause,
            "resume" => Self::Resume,
            "promote" => Self::Promote,
            "abort" => Self::Abort,
            other => {
                return Err(Error::invalid(
                    "action",
                    format!("{other:?} is not pause, resume, promote or abort"),
                ));
            }
        })
    }
}

/// Applies an operator action, persists it, and re-plans at once.
pub async fn act(hub: &Hub, actor: &str, app: &str, action: Action) -> Result<AppRecord> {
    let now = now_unix();
    let record = hub
        .apps
        .try_update_audited(
            app,
            |r| {
                let rollout = r.status.rollout.as_mut().ok_or_else(|| {
                    Error::FailedPrecondition(format!("app {app:?} has no rollout yet"))
                })?;
                match action {
                    Action::Pause => rollout.pause(app),
                    Action::Resume => rollout.resume(),
                    Action::Promote => rollout.promote(),
                    Action::Abort => rollout.abort(now),
                }
                .map_err(|e| Error::FailedPrecondition(format!("app {app:?}: {e}")))
            },
            |r| {
                let rollout = r.status.rollout.as_ref();
                Some(crate::db::audit::Record::new(
                    actor,
                    &format!("rollout.{}", action.word()),
                    format!("app/{app}"),
                    format!(
                        "revision {}: now {:?}",
                        rollout.map(|r| r.revision.as_str()).unwrap_or(""),
                        rollout.map(|r| r.phase)
                    ),
                ))
            },
        )
        .await?
        .ok_or_else(|| Error::AppNotFound(app.to_string()))?;
    plan_app(hub, app).await?;
    Ok(hub.apps.get(app)?.unwrap_or_else(|| (*record).clone()))
}

/// Pins `app` to an earlier revision (the newest stable one before the current, by default); the
/// pinned render then reaches the fleet through a rollout like any other. Returns the revision.
pub async fn pin(hub: &Hub, actor: &str, app: &str, to: Option<&str>) -> Result<String> {
    let mut chosen = String::new();
    hub.apps
        .try_update_audited(app, |r| {
            let s = &mut r.status;
            let revision = match to {
                Some(prefix) => {
                    if prefix.len() < 4 {
                        return Err(Error::invalid(
                            "to",
                            format!("{prefix:?}: give at least 4 characters of a commit"),
                        ));
                    }
                    s.history
                        .iter()
                        .rev()
                        .find(|h| h.revision.starts_with(prefix))
                        .map(|h| h.revision.clone())
                        .ok_or_else(|| {
                            Error::invalid(
                                "to",
                                format!(
                                    "{prefix:?} is not in the history of app {app:?} (see `flotilla app history {app}`)"
                                ),
                            )
                        })?
                }
                None => s
                    .history
                    .iter()
                    .rev()
                    .find(|h| h.rolled_out && Some(&h.revision) != s.stable_revision.as_ref())
                    .map(|h| h.revision.clone())
                    .ok_or_else(|| {
                        Error::FailedPrecondition(format!(
                            "app {app:?} has no earlier revision that was rolled out; name one with --to"
                        ))
                    })?,
            };
            s.pinned = Some(revision.clone());
            chosen = revision;
            Ok(())
        }, |r| {
            Some(crate::db::audit::Record::new(
                actor,
                "app.rollback",
                format!("app/{app}"),
                format!("pinned to {}", r.status.pinned.as_deref().unwrap_or("")),
            ))
        })
        .await?
        .ok_or_else(|| Error::AppNotFound(app.to_string()))?;
    Ok(chosen)
}

/// Returns an app to following its ref.
pub async fn unpin(hub: &Hub, actor: &str, app: &str) -> Result<()> {
    hub.apps
        .try_update_audited(
            app,
            |r| {
                r.status.pinned = None;
                Ok(())
            },
            |_| {
                Some(crate::db::audit::Record::new(
                    actor,
                    "app.rollback",
                    format!("app/{app}"),
                    "unpinned: follows its ref again",
                ))
            },
        )
        .await?
        .ok_or_else(|| Error::AppNotFound(app.to_string()))?;
    Ok(())
}

/// One cluster asked to sync by [`request_sync`].
#[derive(Debug, Clone, PartialEq)]
pub struct Requested {
    pub cluster: String,
    pub id: u64,
    pub digest: String,
    /// Whether the rollout lets it move now, or why it waits.
    pub note: String,
}

/// Records a sync request for every cluster `app` targets (or only `cluster`): each is asked to
/// apply, once, the bundle git wants it to run now. A manual app's rollout moves a cluster only on
/// such a request; an automated app's agent applies at once instead of at its next resync.
pub async fn request_sync(
    hub: &Hub,
    actor: &str,
    app: &str,
    cluster: Option<&str>,
) -> Result<Vec<Requested>> {
    let mut out = Vec::new();
    hub.apps
        .try_update_audited(app, |r| {
            let s = &mut r.status;
            let chosen: Vec<(String, String)> = match cluster {
                Some(c) => {
                    let t = s.target.get(c).ok_or_else(|| {
                        Error::FailedPrecondition(format!(
                            "app {app:?} does not target cluster {c:?} (see `flotilla app get {app}`)"
                        ))
                    })?;
                    vec![(c.to_string(), t.digest.clone())]
                }
                None => s
                    .target
                    .iter()
                    .map(|(c, t)| (c.clone(), t.digest.clone()))
                    .collect(),
            };
            if chosen.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "app {app:?} targets no cluster yet (see `flotilla app get {app}`)"
                )));
            }
            for (c, digest) in chosen {
                s.next_sync_request += 1;
                let id = s.next_sync_request;
                s.sync_requests.insert(
                    c.clone(),
                    crate::db::appstore::SyncRequest {
                        id,
                        digest: digest.clone(),
                    },
                );
                out.push(Requested {
                    cluster: c,
                    id,
                    digest,
                    note: String::new(),
                });
            }
            Ok(())
        }, |r| {
            let asked = r
                .status
                .sync_requests
                .iter()
                .filter(|(c, _)| cluster.is_none_or(|one| one == c.as_str()))
                .map(|(c, q)| format!("{c} (request {}, {})", q.id, q.digest))
                .collect::<Vec<_>>()
                .join(", ");
            Some(crate::db::audit::Record::new(actor, "app.sync", format!("app/{app}"), asked))
        })
        .await?
        .ok_or_else(|| Error::AppNotFound(app.to_string()))?;
    plan_app(hub, app).await?;
    // Planned and flushed: say where each cluster stands now.
    if let Some(record) = hub.apps.get(app)? {
        for q in &mut out {
            let assigned = record.status.assignments.get(&q.cluster);
            q.note = if assigned.is_some_and(|a| a.digest == q.digest) {
                "syncing".into()
            } else {
                let reason = record
                    .status
                    .rollout
                    .as_ref()
                    .and_then(|r| r.clusters.get(&q.cluster))
                    .map(|c| format!("{:?}", c.state))
                    .unwrap_or_default();
                format!("waits for its rollout step ({reason})")
            };
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use flotilla_proto::v1::{AppStatus as Report, HealthStatus, SyncStatus};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::fleet::wake::Wakeups;
    use crate::rollout::Assigned;

    /// An in-memory hub's worth of the handles a planning round takes.
    struct World {
        _db: sled::Db,
        apps: AppStore,
        sessions: Arc<Sessions>,
        reports: Reports,
        metrics: Metrics,
        wake: Arc<Wakeups>,
        _open: Vec<crate::fleet::sessions::Session>,
    }

    impl World {
        fn new(connected: &[&str]) -> Self {
            let db = sled::Config::new().temporary(true).open().unwrap();
            let wake = Arc::new(Wakeups::default());
            let sessions = Arc::new(Sessions::default());
            let shutdown = CancellationToken::new();
            let open = connected
                .iter()
                .map(|c| sessions.open(c, &shutdown, 1))
                .collect();
            Self {
                apps: AppStore::open(&db, Default::default(), Arc::clone(&wake)).unwrap(),
                reports: Reports::open(&db).unwrap(),
                metrics: Metrics::default(),
                sessions,
                wake,
                _db: db,
                _open: open,
            }
        }

        fn planning(&self) -> Planning<'_> {
            Planning {
                apps: &self.apps,
                sessions: &self.sessions,
                reports: &self.reports,
                metrics: &self.metrics,
            }
        }

        fn assigned(&self) -> Vec<String> {
            let record = self.apps.get("web").unwrap().unwrap();
            record.status.assignments.keys().cloned().collect()
        }

        fn healthy(&self, cluster: &str, digest: &str) {
            self.reports.record(
                cluster,
                Report {
                    app: "web".into(),
                    digest: digest.into(),
                    sync: SyncStatus::Synced.into(),
                    health: HealthStatus::Healthy.into(),
                    ..Report::default()
                },
            );
        }
    }

    fn cluster(name: &str, ring: &str) -> ClusterRecord {
        ClusterRecord {
            name: name.into(),
            labels: BTreeMap::from([("ring".to_string(), ring.to_string())]),
            registered_at: 1,
            cert_serial: String::new(),
            cert_not_after: 0,
            serials: Vec::new(),
            last_seen_ms: 0,
            rebuild_requested_at: None,
            recovering_since_ms: None,
            last_recovery_ms: None,
        }
    }

    /// A rendered app whose target is `d1` on each cluster, no rollout yet: canary first.
    fn rendered(clusters: &[&str]) -> AppRecord {
        let mut record = crate::db::appstore::rendered_web(
            "  targets: {selector: {}}\n  rollout: {steps: [{selector: {matchLabels: {ring: canary}}, maxUnavailable: \"100%\"}, {selector: {}, maxUnavailable: \"100%\"}]}\n",
        );
        for c in clusters {
            record.status.target.insert(
                c.to_string(),
                Assigned {
                    digest: "d1".into(),
                    revision: "r1".into(),
                },
            );
        }
        record
    }

    #[tokio::test]
    async fn a_round_assigns_the_canary_then_the_rest_and_wakes_only_whom_it_assigned() {
        let world = World::new(&["a", "b", "c"]);
        let fleet = [
            cluster("a", "canary"),
            cluster("b", "main"),
            cluster("c", "main"),
        ];
        world.apps.put(&rendered(&["a", "b", "c"])).await.unwrap();
        let (mut a, mut b, mut c) = (
            world.wake.subscribe("a"),
            world.wake.subscribe("b"),
            world.wake.subscribe("c"),
        );
        world.wake.take_dirty();

        plan_app_with(&world.planning(), "web", &fleet)
            .await
            .unwrap();
        assert_eq!(world.assigned(), ["a"], "the canary step first");
        assert!(a.rx.has_changed().unwrap());
        assert!(!b.rx.has_changed().unwrap() && !c.rx.has_changed().unwrap());
        a.rx.mark_unchanged();

        // Nothing reported yet: a round changes nothing and wakes nobody.
        plan_app_with(&world.planning(), "web", &fleet)
            .await
            .unwrap();
        assert_eq!(world.assigned(), ["a"]);
        assert!(
            !a.rx.has_changed().unwrap(),
            "an unchanged round writes nothing"
        );

        // The canary reports the new bundle Healthy: the next step goes out.
        world.healthy("a", "d1");
        plan_app_with(&world.planning(), "web", &fleet)
            .await
            .unwrap();
        assert_eq!(world.assigned(), ["a", "b", "c"]);
        assert!(b.rx.has_changed().unwrap() && c.rx.has_changed().unwrap());
        assert!(
            !a.rx.has_changed().unwrap(),
            "the canary's orders did not move"
        );
        b.rx.mark_unchanged();
        c.rx.mark_unchanged();
        let record = world.apps.get("web").unwrap().unwrap();
        assert_eq!(
            record.status.rollout.as_ref().map(|r| r.phase),
            Some(Phase::Progressing)
        );

        world.healthy("b", "d1");
        world.healthy("c", "d1");
        plan_app_with(&world.planning(), "web", &fleet)
            .await
            .unwrap();
        let record = world.apps.get("web").unwrap().unwrap();
        assert_eq!(
            record.status.rollout.as_ref().map(|r| r.phase),
            Some(Phase::Succeeded)
        );
        assert_eq!(record.status.stable_revision.as_deref(), Some("r1"));
    }

    #[tokio::test]
    async fn a_disconnected_cluster_is_still_assigned_but_its_report_is_what_counts() {
        // b has no session: it is told when it connects (its orders are in the store), and the
        // step waits for its report rather than reading its silence as success.
        let world = World::new(&["a", "c"]);
        let fleet = [
            cluster("a", "canary"),
            cluster("b", "main"),
            cluster("c", "main"),
        ];
        world.apps.put(&rendered(&["a", "b", "c"])).await.unwrap();
        world.healthy("a", "d1");
        plan_app_with(&world.planning(), "web", &fleet)
            .await
            .unwrap();
        plan_app_with(&world.planning(), "web", &fleet)
            .await
            .unwrap();
        world.healthy("c", "d1");
        plan_app_with(&world.planning(), "web", &fleet)
            .await
            .unwrap();
        let record = world.apps.get("web").unwrap().unwrap();
        let rollout = record.status.rollout.as_ref().unwrap();
        assert_ne!(rollout.phase, Phase::Succeeded, "{rollout:?}");
        assert_eq!(
            world.assigned(),
            ["a", "b", "c"],
            "b is assigned while it is away"
        );
    }
}
