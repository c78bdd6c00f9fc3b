//! The long waits end with one result line and an exit code a script can act on: `app wait`
//! (0 once every cluster is Synced and Healthy at git's revision, 1 on timeout, naming who it
//! waited on) and `rollout status --watch` (0 Succeeded, 2 paused for an operator, 1 rolled back).

use std::process::Output;
use std::time::Duration;

use anyhow::{Result, ensure};
use flotilla_e2e::Fleet;

const T: Duration = Duration::from_secs(60);

fn deployment(image: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: default}}\nspec:\n  replicas: 2\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec: {{containers: [{{name: web, image: \"{image}\"}}]}}\n"
    )
}

/// (exit code, last stdout line, all of stdout).
fn ended(out: &Output) -> (Option<i32>, String, String) {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let last = stdout.lines().last().unwrap_or_default().to_string();
    (out.status.code(), last, stdout)
}

#[test]
fn app_wait_and_rollout_watch_end_with_a_result_line_and_an_exit_code() -> Result<()> {
    let f = Fleet::start(&[("eu-1", "region=eu"), ("eu-2", "region=eu")])?;
    f.repo.write("web/deploy.yaml", &deployment("nginx:1.27"))?;
    let v1 = f.repo.commit("v1")?;
    f.apply(
        "web",
        "web",
        "  targets: {selector: {matchLabels: {region: eu}}}\n",
    )?;
    f.hub.wait_revision("web", &v1, T)?;

    let (code, last, all) = ended(&f.hub.cli(&["app", "wait", "web", "--timeout", "60s"])?);
    ensure!(code == Some(0), "{all}");
    ensure!(
        last.starts_with(&format!(
            "app web: Synced and Healthy on 2/2 cluster(s) at {}",
            &v1[..12]
        )),
        "{all}"
    );
    let watch = |timeout: &str| {
        f.hub
            .cli(&["rollout", "status", "web", "--watch", "--timeout", timeout])
    };
    let (code, last, all) = ended(&watch("60s")?);
    ensure!(code == Some(0) && last.contains(": Succeeded"), "{all}");

    // A commit that never becomes healthy: the wait times out naming a cluster and why, the
    // rollout pauses at its first failure and the watch says how to go on.
    f.repo
        .write("web/deploy.yaml", &deployment("nginx:broken"))?;
    let v2 = f.repo.commit("v2 broken")?;
    f.hub.wait_revision("web", &v2, T)?;
    let (code, last, all) = ended(&f.hub.cli(&["app", "wait", "web", "--timeout", "3s"])?);
    ensure!(code == Some(1), "{all}");
    ensure!(
        last.starts_with("app web: timed out after 3s: app web at ")
            && last.contains("cluster(s) Synced and Healthy"),
        "{all}"
    );
    ensure!(
        all.contains("eu-1"),
        "the wait names who it waits on: {all}"
    );
    let (code, last, all) = ended(&watch("60s")?);
    ensure!(code == Some(2), "{all}");
    ensure!(
        last.contains(": Paused: ") && last.contains("`flotilla rollout resume web` continues"),
        "{all}"
    );

    // Every command a paused rollout suggests runs as printed (resume, then abort).
    let rollout = f.hub.cli_json(&["rollout", "status", "web"])?;
    let suggested = flotilla_e2e::hints(rollout["message"].as_str().unwrap_or_default());
    ensure!(
        suggested
            == [
                "flotilla rollout resume web".to_string(),
                "flotilla rollout abort web".to_string()
            ],
        "{rollout}"
    );
    f.hub.run_hint(&suggested[0])?;
    let out = f.hub.run_hint(&suggested[1])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, last, all) = ended(&watch("60s")?);
    ensure!(code == Some(1) && last.contains(": RolledBack: "), "{all}");

    // A script can ask for JSON, not for a watch in JSON.
    let out = f
        .hub
        .cli(&["-o", "json", "rollout", "status", "web", "--watch"])?;
    ensure!(!out.status.success());
    Ok(())
}
