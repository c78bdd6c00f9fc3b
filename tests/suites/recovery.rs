//! Rollouts after a failure, through the real hub, agent and CLI binaries: a canary whose PreSync
//! Job failed is fixed by a commit and the fix reaches every cluster; a cluster that failed and
//! was repaired outside git counts again, and `rollout resume` goes on; while a rollout waits,
//! every targeted cluster has a status row and those it has not reached read OutOfSync.

use std::time::Duration;

use anyhow::{Result, ensure};
use flotilla_e2e::{Fleet, wait_for};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

fn config_map(ns: &str, v: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: web, namespace: {ns}}}\ndata: {{v: \"{v}\"}}\n"
    )
}

fn presync_job(image: &str) -> String {
    format!(
        "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: before\n  annotations: {{argocd.argoproj.io/hook: PreSync, argocd.argoproj.io/hook-delete-policy: HookSucceeded}}\nspec:\n  template:\n    spec: {{restartPolicy: Never, containers: [{{name: m, image: \"{image}\"}}]}}\n"
    )
}

fn rollout_cluster<'a>(rollout: &'a Value, cluster: &str) -> &'a Value {
    rollout["clusters"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["cluster"] == cluster))
        .unwrap_or(&Value::Null)
}

fn act(f: &Fleet, verb: &str, app: &str) -> Result<()> {
    let out = f.hub.cli(&["rollout", verb, app])?;
    ensure!(
        out.status.success(),
        "rollout {verb}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// c1, c2 and c3, all `region=eu` (the default strategy takes them in that order).
fn three_clusters() -> Result<Fleet> {
    Fleet::start(&[
        ("c1", "region=eu"),
        ("c2", "region=eu"),
        ("c3", "region=eu"),
    ])
}

/// App `web` from `web/` on every `region=eu` cluster, with the default rollout strategy.
fn apply_web(f: &Fleet) -> Result<()> {
    f.apply(
        "web",
        "web",
        "  targets: {selector: {matchLabels: {region: eu}}}\n",
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_canary_failed_by_its_presync_job_is_fixed_by_a_commit_that_reaches_every_cluster()
-> Result<()> {
    // The default strategy: one step, a quarter (at least one) at a time, pause on failure.
    let f = three_clusters()?;
    f.repo.write("web/cm.yaml", &config_map("default", "1"))?;
    let v1 = f.repo.commit("v1")?;
    apply_web(&f)?;
    f.wait_healthy("web", 3, &v1)?;

    f.repo
        .write("web/before.yaml", &presync_job("migrate:broken"))?;
    f.repo.write("web/cm.yaml", &config_map("default", "2"))?;
    let v2 = f.repo.commit("v2: a migration that fails")?;
    let paused = f.wait_phase("web", &v2, "Paused")?;
    assert_eq!(
        rollout_cluster(&paused, "c1")["state"],
        "Failed",
        "{paused}"
    );

    // The fix: the failed Job stays on c1 (HookSucceeded), and its template is immutable.
    f.repo
        .write("web/before.yaml", &presync_job("migrate:1.1"))?;
    let v3 = f.repo.commit("v3: the migration fixed")?;
    let done = wait_for(T, "v3 reaches every cluster", || {
        let r = f.rollout("web")?;
        if r["revision"] == v3 && r["phase"] == "Paused" {
            // Whatever paused it, resuming must make progress.
            act(&f, "resume", "web")?;
        }
        ensure!(r["revision"] == v3 && r["phase"] == "Succeeded", "{r}");
        Ok(Some(r))
    })?;
    f.wait_healthy("web", 3, &v3)?;
    for c in ["c1", "c2", "c3"] {
        let cm = f.clusters.object(c, "ConfigMap", "default", "web")?;
        assert_eq!(cm.map(|o| o["data"]["v"].clone()), Some("2".into()), "{c}");
    }
    assert_eq!(done["clusters"].as_array().map(Vec::len), Some(3), "{done}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_cluster_repaired_outside_git_counts_again_and_resume_reaches_every_cluster()
-> Result<()> {
    let f = three_clusters()?;
    let namespace = "apiVersion: v1\nkind: Namespace\nmetadata: {name: ops}\n";
    // c1, first in the rollout, lacks the namespace the app deploys to.
    for c in ["c2", "c3"] {
        f.clusters.kubectl(c, &["apply", "-f", "-"], namespace)?;
    }
    f.repo.write("web/cm.yaml", &config_map("ops", "1"))?;
    let v1 = f.repo.commit("v1")?;
    apply_web(&f)?;
    let paused = f.wait_phase("web", &v1, "Paused")?;
    assert_eq!(
        rollout_cluster(&paused, "c1")["state"],
        "Failed",
        "{paused}"
    );

    // While it waits, every targeted cluster has a row; those not reached say what they wait for.
    let rows = wait_for(T, "a row for every targeted cluster", || {
        let rows = f.rows("web")?;
        ensure!(rows.len() == 3, "{rows:?}");
        Ok(Some(rows))
    })?;
    for row in rows.iter().filter(|r| r["cluster"] != "c1") {
        assert_eq!(row["sync"], "OutOfSync", "{row}");
        assert!(
            row["message"]
                .as_str()
                .is_some_and(|m| m.contains("waiting for rollout step 1") && m.contains("paused")),
            "{row}"
        );
    }

    // Repaired by hand: c1 leaves Failed once it runs the bundle Synced and Healthy.
    f.clusters.kubectl("c1", &["apply", "-f", "-"], namespace)?;
    let recovered = wait_for(T, "c1 recovered in the rollout", || {
        let r = f.rollout("web")?;
        let c1 = rollout_cluster(&r, "c1");
        ensure!(c1["state"] == "Healthy", "{r}");
        Ok(Some(r))
    })?;
    assert!(
        rollout_cluster(&recovered, "c1")["reason"]
            .as_str()
            .is_some_and(|m| m.contains("recovered")),
        "{recovered}"
    );
    assert_eq!(
        recovered["phase"], "Paused",
        "a pause waits for its operator"
    );
    act(&f, "resume", "web")?;
    f.wait_phase("web", &v1, "Succeeded")?;
    f.wait_healthy("web", 3, &v1)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn clusters_a_paused_rollout_has_not_reached_read_out_of_sync_at_the_revision_they_run()
-> Result<()> {
    let f = Fleet::start(&[
        ("canary-1", "region=eu,ring=canary"),
        ("eu-1", "region=eu"),
        ("eu-2", "region=eu"),
    ])?;
    f.repo.write("web/cm.yaml", &config_map("default", "1"))?;
    let v1 = f.repo.commit("v1")?;
    f.apply(
        "web",
        "web",
        "  targets: {selector: {matchLabels: {region: eu}}}\n  rollout:\n    steps:\n      - {name: canary, selector: {matchLabels: {ring: canary}}, pause: true}\n",
    )?;
    f.wait_phase("web", &v1, "Paused")?;
    act(&f, "promote", "web")?;
    f.wait_healthy("web", 3, &v1)?;

    f.repo.write("web/cm.yaml", &config_map("default", "2"))?;
    let v2 = f.repo.commit("v2")?;
    f.wait_phase("web", &v2, "Paused")?;
    let rows = wait_for(T, "the canary on v2, the rest waiting", || {
        let rows = f.rows("web")?;
        let canary = rows.iter().find(|r| r["cluster"] == "canary-1");
        ensure!(
            canary.is_some_and(|c| c["revision"] == v2 && c["sync"] == "Synced"),
            "{rows:?}"
        );
        Ok(Some(rows))
    })?;
    assert_eq!(rows.len(), 3, "{rows:?}");
    for row in rows.iter().filter(|r| r["cluster"] != "canary-1") {
        assert_eq!(row["sync"], "OutOfSync", "{row}");
        assert_eq!(row["revision"], v1, "the revision it runs: {row}");
        assert_eq!(row["desired_revision"], v2, "{row}");
        let message = row["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("waiting for rollout step 2 (rest), rollout paused"),
            "{row}"
        );
    }
    act(&f, "promote", "web")?;
    f.wait_healthy("web", 3, &v2)?;
    Ok(())
}
