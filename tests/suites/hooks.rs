//! Hooks as Argo CD users expect them after something failed: a revert runs its hooks anew and
//! replaces the failed hook Job a bad revision left; a `Sync` hook runs in its wave; deleting an
//! app deletes the hook Jobs it left. Through the real hub, agent and CLI binaries, with kubectl
//! as an independent client of the cluster.

use std::time::Duration;

use anyhow::{Result, ensure};
use flotilla_e2e::{Fleet, wait_for};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

/// A Job hook; `meta` is its metadata as flow YAML.
fn job(meta: &str, image: &str) -> String {
    format!(
        "apiVersion: batch/v1\nkind: Job\nmetadata: {meta}\nspec:\n  template:\n    spec: {{restartPolicy: Never, containers: [{{name: m, image: \"{image}\"}}]}}\n"
    )
}

fn config_map(name: &str, annotations: &str, v: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}, annotations: {{{annotations}}}}}\ndata: {{v: \"{v}\"}}\n"
    )
}

/// The hook runs `app get` shows for the first cluster: (phase, name, health).
fn hook_runs(app: &Value) -> Vec<(String, String, String)> {
    app["clusters"][0]["hooks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| {
            let s = |k: &str| h[k].as_str().unwrap_or_default().to_string();
            (s("phase"), s("name"), s("health"))
        })
        .collect()
}

fn resource_version_of(obj: &Value) -> u64 {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revert_reruns_the_hooks_and_replaces_the_failed_hook_job() -> Result<()> {
    let f = Fleet::start(&[("eu-1", "region=eu")])?;
    // As argocd-example-apps' pre-post-sync: a named PreSync Job deleted only on success.
    let before = |image: &str| {
        job(
            "{name: before, annotations: {argocd.argoproj.io/hook: PreSync, argocd.argoproj.io/hook-delete-policy: HookSucceeded}}",
            image,
        )
    };
    f.repo.write("web/before.yaml", &before("busybox:1.36"))?;
    f.repo.write("web/cm.yaml", &config_map("web", "", "1"))?;
    let v1 = f.repo.commit("v1")?;
    f.apply("web", "web", "  targets: {clusters: [eu-1]}\n")?;
    f.wait_healthy("web", 1, &v1)?;
    let first_run = hook_runs(&f.hub.app("web")?);
    assert_eq!(first_run.len(), 1, "{first_run:?}");
    assert!(
        f.clusters.objects("eu-1", "Job", "default")?.is_empty(),
        "HookSucceeded deleted the Job"
    );

    // v2's PreSync Job fails; it stays (its policy deletes it only on success).
    f.repo.write("web/before.yaml", &before("busybox:broken"))?;
    f.repo.write("web/cm.yaml", &config_map("web", "", "2"))?;
    let v2 = f.repo.commit("v2: a migration that fails")?;
    wait_for(T, &format!("{v2}'s PreSync hook failed"), || {
        let app = f.hub.app("web")?;
        let c = &app["clusters"][0];
        ensure!(c["health"] == "Degraded", "{app}");
        // Named after the hook, not after an object the failure stopped.
        let message = c["message"].as_str().unwrap_or_default();
        ensure!(
            message.starts_with("Job default/before: PreSync hook failed"),
            "{message}"
        );
        Ok(Some(()))
    })?;
    let failed = f.clusters.object("eu-1", "Job", "default", "before")?;
    assert!(failed.is_some(), "the failed hook Job is left in place");
    let failed_rv = failed.as_ref().map_or(0, resource_version_of);

    // A revert: v3's bundle is v1's, whose hooks already ran once. They run anew, and the failed
    // Job (its template is immutable) is replaced, not patched.
    f.repo.git(&["revert", "--no-edit", "HEAD"])?;
    let v3 = f.repo.git(&["rev-parse", "HEAD"])?.trim().to_string();
    f.wait_healthy("web", 1, &v3)?;
    let app = wait_for(T, "the PreSync hook ran again", || {
        let app = f.hub.app("web")?;
        let runs = hook_runs(&app);
        // The last runs shown were v2's failed one: a Healthy run is a new one.
        ensure!(
            runs == [("PreSync".into(), "before".into(), "Healthy".into())],
            "{app}"
        );
        Ok(Some(app))
    })?;
    let cm = f.clusters.object("eu-1", "ConfigMap", "default", "web")?;
    assert_eq!(cm.map(|c| c["data"]["v"].clone()), Some("1".into()));
    let left = f.clusters.object("eu-1", "Job", "default", "before")?;
    assert!(
        left.is_none(),
        "the rerun succeeded and HookSucceeded deleted it (the failed one was replaced, rv {failed_rv}): {left:?} {app}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sync_hook_runs_between_the_waves_around_it() -> Result<()> {
    let f = Fleet::start(&[("eu-1", "region=eu")])?;
    f.repo.write(
        "web/first.yaml",
        &config_map("first", "argocd.argoproj.io/sync-wave: \"0\"", "1"),
    )?;
    f.repo.write(
        "web/hook.yaml",
        &config_map(
            "in-wave-1",
            "argocd.argoproj.io/hook: Sync, argocd.argoproj.io/sync-wave: \"1\"",
            "1",
        ),
    )?;
    f.repo.write(
        "web/last.yaml",
        &config_map("last", "argocd.argoproj.io/sync-wave: \"2\"", "1"),
    )?;
    let v1 = f.repo.commit("v1")?;
    f.apply("web", "web", "  targets: {clusters: [eu-1]}\n")?;
    f.wait_healthy("web", 1, &v1)?;
    // resourceVersions are one total order per cluster: creation order.
    let rv = |name: &str| -> Result<u64> {
        let obj = f.clusters.object("eu-1", "ConfigMap", "default", name)?;
        Ok(obj.as_ref().map_or(0, resource_version_of))
    };
    let (first, hook, last) = (rv("first")?, rv("in-wave-1")?, rv("last")?);
    assert!(
        0 < first && first < hook && hook < last,
        "wave 0 ({first}), the wave-1 Sync hook ({hook}), wave 2 ({last})"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_an_app_deletes_the_hook_jobs_it_left() -> Result<()> {
    let f = Fleet::start(&[("eu-1", "region=eu")])?;
    // Default policy (BeforeHookCreation): each Job stays until the hook's next run.
    f.repo.write(
        "web/migrate.yaml",
        &job(
            "{name: migrate, annotations: {argocd.argoproj.io/hook: PreSync}}",
            "busybox:1.36",
        ),
    )?;
    f.repo.write(
        "web/notify.yaml",
        &job(
            "{generateName: notify-, annotations: {argocd.argoproj.io/hook: PostSync}}",
            "busybox:1.36",
        ),
    )?;
    f.repo.write("web/cm.yaml", &config_map("web", "", "1"))?;
    let v1 = f.repo.commit("v1")?;
    f.apply("web", "web", "  targets: {clusters: [eu-1]}\n")?;
    f.wait_healthy("web", 1, &v1)?;
    let jobs = wait_for(T, "both hook Jobs ran", || {
        let jobs = f.clusters.objects("eu-1", "Job", "default")?;
        ensure!(jobs.len() == 2, "{jobs:?}");
        Ok(Some(jobs))
    })?;
    // A second revision replaces each hook's earlier run: still two Jobs, not four.
    f.repo.write("web/cm.yaml", &config_map("web", "", "2"))?;
    let v2 = f.repo.commit("v2")?;
    f.wait_healthy("web", 1, &v2)?;
    wait_for(T, "the hooks ran for v2", || {
        let now = f.clusters.objects("eu-1", "Job", "default")?;
        ensure!(
            now.len() == 2
                && now.iter().all(|j| !jobs
                    .iter()
                    .any(|o| o["metadata"]["uid"] == j["metadata"]["uid"])),
            "{now:?}"
        );
        Ok(Some(()))
    })?;

    let out = f.hub.cli(&["app", "delete", "web"])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(T, "the app's objects and hook Jobs are gone", || {
        let jobs = f.clusters.objects("eu-1", "Job", "default")?;
        let cm = f.clusters.object("eu-1", "ConfigMap", "default", "web")?;
        ensure!(jobs.is_empty() && cm.is_none(), "{jobs:?} {cm:?}");
        Ok(Some(()))
    })?;
    Ok(())
}

/// While a pass waits on a slow wave or hook, the cluster's row says on what (a report, not a held
/// one), and `app get`'s hook table reads each hook's result.
#[tokio::test(flavor = "multi_thread")]
async fn a_sync_waiting_on_a_wave_or_a_hook_says_on_what_meanwhile() -> Result<()> {
    let f = Fleet::start(&[("eu-1", "region=eu")])?;
    let slow = "kubesim.flotilla.dev/ready-after: 4s";
    f.repo.write(
        "web/before.yaml",
        &job(
            &format!(
                "{{name: migrate, annotations: {{argocd.argoproj.io/hook: PreSync, {slow}}}}}"
            ),
            "busybox:1.36",
        ),
    )?;
    f.repo.write(
        "web/api.yaml",
        &format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: api, annotations: {{argocd.argoproj.io/sync-wave: \"0\", {slow}}}}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: api}}}}\n  template:\n    metadata: {{labels: {{app: api}}}}\n    spec: {{containers: [{{name: api, image: \"nginx:1.27\"}}]}}\n"
        ),
    )?;
    f.repo.write(
        "web/cm.yaml",
        &config_map("web", "argocd.argoproj.io/sync-wave: \"1\"", "1"),
    )?;
    let v1 = f.repo.commit("v1")?;
    f.apply("web", "web", "  targets: {clusters: [eu-1]}\n")?;

    let mut seen: Vec<String> = Vec::new();
    wait_for(
        T,
        "web Synced and Healthy, having said what it waited on",
        || {
            let rows = f.rows("web")?;
            let row = rows.first().cloned().unwrap_or_default();
            let message = row["message"].as_str().unwrap_or_default().to_string();
            if !message.is_empty() && seen.last() != Some(&message) {
                seen.push(message);
            }
            ensure!(
                row["revision"] == v1.as_str()
                    && row["sync"] == "Synced"
                    && row["health"] == "Healthy",
                "{row}"
            );
            Ok(Some(()))
        },
    )?;
    let said = |needle: &str| seen.iter().any(|m| m.contains(needle));
    ensure!(
        said("PreSync hook: waiting for Job default/migrate (Progressing"),
        "{seen:#?}"
    );
    ensure!(
        said("wave 1 of 2 (sync-wave 0): waiting for Deployment default/api (Progressing"),
        "{seen:#?}"
    );

    let table = f.hub.cli(&["app", "get", "web"])?;
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    let hook_line = table
        .lines()
        .find(|l| l.contains("Job default/migrate"))
        .unwrap_or_default();
    ensure!(
        table.contains("RESULT")
            && hook_line.contains("PreSync")
            && hook_line.contains("Succeeded"),
        "{table}"
    );
    Ok(())
}
