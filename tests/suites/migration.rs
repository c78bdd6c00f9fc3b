//! A data directory written by an earlier release keeps working: the hub opened on it moves its
//! app records to the keyed per-cluster layout and keeps every cluster, app, revision of history
//! and rollout state. The fixture (`tests/fixtures/hub-data-2026-12-07.tar.gz`) was written by the
//! release before the layout changed (dd0e1ba) with `write_fixture` below, which also recorded
//! what that release's CLI showed (`expect.json` inside the archive).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use flotilla_e2e::{Fleet, Hub, HubOptions, wait_for};
use serde_json::{Value, json};

const FIXTURE: &str = "hub-data-2026-12-07.tar.gz";

fn fixture_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(FIXTURE)
}

fn manifests(version: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: web}}\ndata: {{version: \"{version}\"}}\n"
    )
}

/// Writes the fixture with the binaries in `FLOTILLA_E2E_BIN_DIR` (an earlier release's): three
/// clusters, an app rolled out in two steps at two revisions and rolled back to the first.
#[test]
#[ignore = "writes the fixture; run once with FLOTILLA_E2E_BIN_DIR set to the earlier release's binaries"]
fn write_fixture() -> Result<()> {
    ensure!(
        std::env::var_os("FLOTILLA_E2E_BIN_DIR").is_some(),
        "set FLOTILLA_E2E_BIN_DIR to the binaries of the release whose data dir to record"
    );
    let mut fleet = Fleet::start(&[
        ("eu-1", "region=eu"),
        ("eu-2", "region=eu"),
        ("us-1", "region=us"),
    ])?;
    fleet.repo.write("web/cm.yaml", &manifests("1"))?;
    let v1 = fleet.repo.commit("v1")?;
    let strategy = "  targets: {selector: {matchExpressions: [{key: region, operator: Exists}]}}\n  rollout:\n    steps:\n      - {name: eu, selector: {matchLabels: {region: eu}}}\n      - {name: us, selector: {matchLabels: {region: us}}}\n";
    fleet.apply("web", "web", strategy)?;
    fleet.wait_phase("web", &v1, "Succeeded")?;
    fleet.repo.write("web/cm.yaml", &manifests("2"))?;
    let v2 = fleet.repo.commit("v2")?;
    fleet.wait_phase("web", &v2, "Succeeded")?;
    let out = fleet
        .hub
        .cli(&["app", "rollback", "web", "--to", &v1[..10]])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fleet.wait_phase("web", &v1, "Succeeded")?;
    fleet.wait_healthy("web", 3, &v1)?;
    let expect = json!({
        "app": fleet.hub.app("web")?,
        "rollout": fleet.rollout("web")?,
        "clusters": fleet.hub.cli_json(&["cluster", "list"])?,
    });
    fleet.hub.process.terminate();
    fleet.hub.process.wait_exit(Duration::from_secs(30))?;
    let dir = fleet.hub.dir.path();
    std::fs::write(dir.join("expect.json"), serde_json::to_vec_pretty(&expect)?)?;
    let out = Command::new("tar")
        .arg("-czf")
        .arg(fixture_path())
        .arg("-C")
        .arg(dir)
        .args(["hub", "expect.json"])
        .output()?;
    ensure!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The fixture unpacked into a new temporary directory: (dir, what the earlier release showed).
fn unpack() -> Result<(tempfile::TempDir, Value)> {
    let dir = tempfile::tempdir()?;
    let out = Command::new("tar")
        .arg("-xzf")
        .arg(fixture_path())
        .arg("-C")
        .arg(dir.path())
        .output()
        .context("running tar")?;
    ensure!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expect = serde_json::from_slice(&std::fs::read(dir.path().join("expect.json"))?)?;
    Ok((dir, expect))
}

fn names_and_labels(clusters: &Value) -> Vec<(Value, Value)> {
    clusters
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| (c["name"].clone(), c["labels"].clone()))
        .collect()
}

fn per_cluster(app: &Value) -> Vec<(Value, Value)> {
    app["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| (c["cluster"].clone(), c["assigned"].clone()))
        .collect()
}

fn rollout_clusters(rollout: &Value) -> Value {
    let mut out: Vec<Value> = rollout["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| json!([c["cluster"], c["state"], c["step"], c["digest"]]))
        .collect();
    out.sort_by_key(|v| v.to_string());
    Value::Array(out)
}

/// What the hub shows of the fixture's state, compared with what the earlier release showed.
fn check(hub: &Hub, expect: &Value) -> Result<()> {
    let clusters = hub.cli_json(&["cluster", "list"])?;
    ensure!(
        names_and_labels(&clusters) == names_and_labels(&expect["clusters"]),
        "clusters: {clusters} against {}",
        expect["clusters"]
    );
    let app = hub.app("web")?;
    let was = &expect["app"];
    for field in [
        "revision",
        "pinned_revision",
        "stable_revision",
        "rollout_phase",
    ] {
        ensure!(
            app[field] == was[field],
            "{field}: {} against {}",
            app[field],
            was[field]
        );
    }
    ensure!(per_cluster(&app) == per_cluster(was), "assignments: {app}");
    ensure!(
        per_cluster(&app).len() == 3,
        "three clusters assigned: {app}"
    );
    let (history, old) = (app["history"].as_array(), was["history"].as_array());
    ensure!(history.map(Vec::len) == old.map(Vec::len), "history: {app}");
    for (h, o) in history.into_iter().flatten().zip(old.into_iter().flatten()) {
        ensure!(
            h["revision"] == o["revision"] && h["rolled_out"] == o["rolled_out"],
            "{h} against {o}"
        );
        // The earlier release kept cluster → digest per entry; this one keeps digest → clusters.
        let mut digests: Vec<&str> = o["digests"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(_, d)| d.as_str())
            .collect();
        digests.sort();
        digests.dedup();
        let bundles = h["bundles"].as_object().context("bundles")?;
        ensure!(
            bundles.keys().map(String::as_str).collect::<Vec<_>>() == digests,
            "{h} against {o}"
        );
        let clusters: u64 = bundles.values().filter_map(Value::as_u64).sum();
        ensure!(clusters == 3, "{h}");
    }
    let rollout = hub.cli_json(&["rollout", "status", "web"])?;
    for field in ["revision", "phase", "id"] {
        ensure!(
            rollout[field] == expect["rollout"][field],
            "{field}: {rollout}"
        );
    }
    ensure!(
        rollout_clusters(&rollout) == rollout_clusters(&expect["rollout"]),
        "rollout clusters: {rollout} against {}",
        expect["rollout"]
    );
    Ok(())
}

#[test]
fn a_data_dir_of_the_earlier_release_keeps_clusters_apps_history_and_rollouts() -> Result<()> {
    let (dir, expect) = unpack()?;
    let mut hub = Hub::serve_existing(dir, HubOptions::default())?;
    // The app's repository is gone with the machine that wrote the fixture: its renders fail
    // and keep the last good assignments, which is what is checked.
    wait_for(Duration::from_secs(30), "the app's render to fail", || {
        let app = hub.app("web")?;
        ensure!(app["last_error"].is_string(), "{app}");
        Ok(Some(()))
    })?;
    check(&hub, &expect)?;
    ensure!(
        hub.process
            .log_text()
            .contains("moved app records to per-cluster slots"),
        "the hub says it moved the records:\n{}",
        hub.process.log_text()
    );
    // Moved once and durably: a hub killed and started again reads the same, moving nothing.
    hub.restart()?;
    check(&hub, &expect)?;
    Ok(())
}
