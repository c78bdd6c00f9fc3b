//! The long waits — `app wait`, `rollout status --watch`, `cluster rebuild --wait`: live progress
//! on a terminal (appended frames otherwise), then one result line and an exit code a script can
//! act on. Deciding whether a wait is over is a pure function of what the hub said.

use std::time::{Duration, Instant};

use flotilla_proto::v1::admin_client::AdminClient;
use flotilla_proto::v1::{
    App, Cluster, GetAppRequest, GetClusterRequest, GetRolloutRequest, HealthStatus, RolloutPhase,
    RolloutStatus, SyncStatus,
};
use tonic::transport::Channel;

use crate::live::Live;
use crate::terminal::cell;
use crate::{Exit, output, rpc_error};

/// How often the hub is asked again.
const POLL: Duration = Duration::from_millis(500);
/// Clusters listed by name in a frame; the rest are counted.
const LISTED: usize = 20;

/// Where a wait stands after one look at the hub.
#[derive(Debug, PartialEq)]
enum Step {
    /// Keep waiting; the frame says on what.
    Waiting(Vec<String>),
    /// Over: the result line, and the exit code (0 when it went as hoped).
    Over(String, u8),
}

/// `app wait`: every cluster the app targets runs the bundle git wants, Synced and Healthy.
fn app_step(app: &App) -> Step {
    let done = |c: &&flotilla_proto::v1::AppCluster| {
        c.assigned_digest == c.digest
            && c.sync() == SyncStatus::Synced
            && c.health() == HealthStatus::Healthy
    };
    let name = cell(&app.name);
    let revision = output::short(&app.revision);
    if app.clusters.is_empty() {
        let why = if app.note.is_empty() {
            "it targets no cluster"
        } else {
            app.note.as_str()
        };
        return Step::Over(format!("app {name}: nothing to wait for: {}", cell(why)), 1);
    }
    let ready = app.clusters.iter().filter(done).count();
    let total = app.clusters.len();
    if ready == total {
        return Step::Over(
            format!("app {name}: Synced and Healthy on {total}/{total} cluster(s) at {revision}"),
            0,
        );
    }
    let mut frame = vec![format!(
        "app {name} at {revision}: {ready}/{total} cluster(s) Synced and Healthy"
    )];
    if !app.last_error.is_empty() {
        frame.push(format!("  git: {}", cell(&app.last_error)));
    }
    let waiting: Vec<_> = app.clusters.iter().filter(|c| !done(c)).collect();
    for c in waiting.iter().take(LISTED) {
        let why = if c.assigned_digest != c.digest && c.message.is_empty() {
            "the rollout has not given it this revision yet"
        } else {
            c.message.as_str()
        };
        frame.push(format!(
            "  {}  {}/{}  {}",
            cell(&c.cluster),
            c.sync().word(),
            c.health().word(),
            cell(why)
        ));
    }
    if waiting.len() > LISTED {
        frame.push(format!("  … and {} more", waiting.len() - LISTED));
    }
    Step::Waiting(frame)
}

/// `rollout status --watch`: over when the rollout stops moving on its own.
fn rollout_step(r: &RolloutStatus) -> Step {
    let head = format!(
        "rollout of {} at {}",
        cell(&r.app),
        output::short(&r.revision)
    );
    match r.phase() {
        RolloutPhase::Succeeded => Step::Over(format!("{head}: Succeeded"), 0),
        RolloutPhase::RolledBack | RolloutPhase::Failed => Step::Over(
            format!("{head}: {}: {}", r.phase().word(), cell(&r.message)),
            1,
        ),
        // Every pause (an operator's, a step's `pause: true`, the failure threshold's) waits for
        // an operator: watching longer would only run out the timeout.
        RolloutPhase::Paused => Step::Over(
            format!(
                "{head}: Paused: {} (`flotilla rollout resume {}` continues)",
                cell(&r.message),
                cell(&r.app)
            ),
            2,
        ),
        RolloutPhase::Progressing => Step::Waiting(output::rollout_lines(r)),
        RolloutPhase::Unspecified => Step::Over(format!("{head}: the hub reports no phase"), 1),
    }
}

/// `cluster rebuild --wait`: the replacement registered and every app it runs is Healthy.
/// `lost_serial` is the certificate the lost cluster held: the replacement registers with another.
fn rebuild_step(c: &Cluster, lost_serial: &str) -> Step {
    let name = cell(&c.name);
    let replaced = c.cert_serial != lost_serial;
    if replaced && c.recovering_since_unix_ms == 0 && c.last_recovery_ms > 0 {
        return Step::Over(
            format!(
                "cluster {name} rebuilt: every app Healthy {:.1} s after it registered",
                c.last_recovery_ms as f64 / 1000.0
            ),
            0,
        );
    }
    let state = if replaced {
        "registered; converging on its apps"
    } else {
        "waiting for the replacement agent to register"
    };
    Step::Waiting(vec![format!("cluster {name}: {state}")])
}

/// Polls `look` until its step is over or `timeout` passes, drawing each new frame.
async fn until<F, Fut>(what: &str, timeout: Duration, mut look: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Step>>,
{
    let started = Instant::now();
    let mut live = Live::new();
    let mut last = Vec::new();
    loop {
        let step = look().await?;
        let elapsed = started.elapsed();
        match step {
            Step::Over(line, code) => {
                out!("{line} ({:.1} s)", elapsed.as_secs_f64());
                return if code == 0 {
                    Ok(())
                } else {
                    Err(Exit(code).into())
                };
            }
            Step::Waiting(frame) => {
                if elapsed >= timeout {
                    out!(
                        "{what}: timed out after {}: {}",
                        humantime::format_duration(timeout),
                        frame.first().map_or("", String::as_str).trim()
                    );
                    return Err(Exit(1).into());
                }
                if frame != last {
                    live.show(&frame);
                    last = frame;
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

pub(crate) async fn app(
    admin: &mut AdminClient<Channel>,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    until(&format!("app {}", cell(name)), timeout, || {
        let mut admin = admin.clone();
        let name = name.to_string();
        async move {
            let app = admin
                .get_app(GetAppRequest { name })
                .await
                .map_err(rpc_error)?
                .into_inner();
            Ok(app_step(&app))
        }
    })
    .await
}

pub(crate) async fn rollout(
    admin: &mut AdminClient<Channel>,
    app: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    until(&format!("rollout of {}", cell(app)), timeout, || {
        let mut admin = admin.clone();
        let app = app.to_string();
        async move {
            let r = admin
                .get_rollout(GetRolloutRequest { app })
                .await
                .map_err(rpc_error)?
                .into_inner();
            Ok(rollout_step(&r))
        }
    })
    .await
}

pub(crate) async fn rebuild(
    admin: &mut AdminClient<Channel>,
    name: &str,
    lost_serial: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    until(&format!("cluster {}", cell(name)), timeout, || {
        let mut admin = admin.clone();
        let name = name.to_string();
        let lost = lost_serial.to_string();
        async move {
            let c = admin
                .get_cluster(GetClusterRequest { name })
                .await
                .map_err(rpc_error)?
                .into_inner();
            Ok(rebuild_step(&c, &lost))
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use flotilla_proto::v1::AppCluster;

    use super::*;

    fn cluster(name: &str, assigned: &str, sync: SyncStatus, health: HealthStatus) -> AppCluster {
        AppCluster {
            cluster: name.into(),
            digest: "d2".into(),
            assigned_digest: assigned.into(),
            sync: sync.into(),
            health: health.into(),
            message: String::new(),
            hooks: vec![],
        }
    }

    fn app(clusters: Vec<AppCluster>) -> App {
        App {
            name: "web".into(),
            revision: "0123456789abcdef".into(),
            clusters,
            note: "no cluster matches the targets".into(),
            ..App::default()
        }
    }

    #[test]
    fn an_app_wait_ends_only_when_every_cluster_runs_the_wanted_bundle_synced_and_healthy() {
        use HealthStatus::{Healthy, Progressing};
        use SyncStatus::{OutOfSync, Synced};
        let over = |a: &App| match app_step(a) {
            Step::Over(line, code) => Some((line, code)),
            Step::Waiting(_) => None,
        };
        for (clusters, expect) in [
            (
                vec![
                    cluster("eu-1", "d2", Synced, Healthy),
                    cluster("us-1", "d2", Synced, Healthy),
                ],
                Some(0),
            ),
            // Healthy on the old bundle is not done.
            (
                vec![
                    cluster("eu-1", "d2", Synced, Healthy),
                    cluster("us-1", "d1", Synced, Healthy),
                ],
                None,
            ),
            (vec![cluster("eu-1", "d2", Synced, Progressing)], None),
            (vec![cluster("eu-1", "d2", OutOfSync, Healthy)], None),
            // Nothing to wait for is a failure, not a success.
            (vec![], Some(1)),
        ] {
            let a = app(clusters.clone());
            assert_eq!(over(&a).map(|(_, code)| code), expect, "{clusters:?}");
        }
        let (line, _) = over(&app(vec![])).unwrap();
        assert!(line.contains("no cluster matches the targets"), "{line}");
        let Step::Waiting(frame) = app_step(&app(vec![
            cluster("eu-1", "d2", Synced, Healthy),
            cluster("us-1", "d1", OutOfSync, Healthy),
        ])) else {
            panic!("still waiting");
        };
        assert_eq!(
            frame[0],
            "app web at 0123456789ab: 1/2 cluster(s) Synced and Healthy"
        );
        assert!(
            frame[1].contains("us-1") && frame[1].contains("has not given it"),
            "{frame:?}"
        );
        assert_eq!(frame.len(), 2, "done clusters are not listed: {frame:?}");
    }

    #[test]
    fn a_rollout_watch_ends_on_success_failure_or_a_pause_for_an_operator() {
        let rollout = |phase: RolloutPhase, paused: &str| RolloutStatus {
            app: "web".into(),
            revision: "0123456789abcdef".into(),
            phase: phase.into(),
            paused_reason: paused.into(),
            message: "why".into(),
            ..RolloutStatus::default()
        };
        let code = |r: &RolloutStatus| match rollout_step(r) {
            Step::Over(_, code) => Some(code),
            Step::Waiting(_) => None,
        };
        for (phase, paused, expect) in [
            (RolloutPhase::Succeeded, "", Some(0)),
            (RolloutPhase::RolledBack, "", Some(1)),
            (RolloutPhase::Failed, "", Some(1)),
            (RolloutPhase::Paused, "Operator", Some(2)),
            (RolloutPhase::Paused, "Failures", Some(2)),
            (RolloutPhase::Paused, "Step", Some(2)),
            (RolloutPhase::Progressing, "", None),
            (RolloutPhase::Unspecified, "", Some(1)),
        ] {
            assert_eq!(code(&rollout(phase, paused)), expect, "{phase:?} {paused}");
        }
        let Step::Over(line, _) = rollout_step(&rollout(RolloutPhase::Paused, "Operator")) else {
            panic!("over");
        };
        assert!(line.contains("`flotilla rollout resume web`"), "{line}");
    }

    #[test]
    fn a_rebuild_wait_ends_when_a_new_certificate_converged() {
        let c = |serial: &str, recovering: i64, last: i64| Cluster {
            name: "eu-1".into(),
            cert_serial: serial.into(),
            recovering_since_unix_ms: recovering,
            last_recovery_ms: last,
            ..Cluster::default()
        };
        let over = |c: &Cluster| matches!(rebuild_step(c, "old"), Step::Over(_, 0));
        assert!(
            !over(&c("old", 0, 900)),
            "an earlier rebuild's figure is not this one"
        );
        assert!(!over(&c("new", 5, 900)), "still converging");
        assert!(over(&c("new", 0, 900)));
    }
}
