//! Hub outages: 200 agents keep their clusters while the hub is gone; when it returns they come back
//! on their own, paced by the hub's handshake admission (peak rate recorded), and status never shows
//! a cluster Healthy before it has reported again.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use flotilla_e2e::{GitRepo, Hub, HubOptions, InProcessAgents, SimCluster, wait_for};

const CLUSTERS: usize = 200;
const RATE: u64 = 40;
const BURST: u64 = 20;

#[test]
fn two_hundred_agents_ride_out_a_hub_restart_at_a_bounded_handshake_rate() -> Result<()> {
    let names: Vec<String> = (0..CLUSTERS).map(|i| format!("c{i:03}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let clusters = SimCluster::start_many(&refs)?;
    let mut hub = Hub::start(HubOptions {
        http: true,
        heartbeat_interval: "5s".into(),
        extra_args: vec![
            "--max-handshakes-per-second".into(),
            RATE.to_string(),
            "--handshake-burst".into(),
            BURST.to_string(),
        ],
        ..HubOptions::default()
    })?;
    let token = hub.token(&["--uses", &CLUSTERS.to_string()])?;
    let dir = tempfile::tempdir()?;
    let _agents = InProcessAgents::start(&hub, &clusters, &names, &token, dir.path())?;
    let repo = GitRepo::init(&dir.path().join("repo"))?;
    repo.write(
        "web/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web}\ndata: {v: \"1\"}\n",
    )?;
    let v1 = repo.commit("v1")?;
    hub.apply_app(&format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: web}}\nspec:\n  source: {{repoURL: \"{}\", path: web}}\n  targets: {{selector: {{matchExpressions: [{{key: region, operator: Exists}}]}}}}\n  rollout: {{steps: [{{selector: {{}}, maxUnavailable: \"100%\"}}]}}\n",
        repo.url()
    ))?;
    let healthy = |hub: &Hub| -> Result<usize> {
        Ok(hub
            .status()?
            .iter()
            .filter(|r| r["revision"] == v1.as_str() && r["health"] == "Healthy")
            .count())
    };
    // Which clusters are not there yet, and why, for the wait's error.
    let all_healthy = |hub: &Hub| -> Result<Option<()>> {
        let n = healthy(hub)?;
        if n != CLUSTERS {
            let rows = hub.status()?;
            let bad: Vec<_> = rows
                .iter()
                .filter(|r| r["health"] != "Healthy" || r["revision"] != v1.as_str())
                .map(|r| {
                    format!(
                        "{} {} {} {}",
                        r["cluster"], r["sync"], r["health"], r["message"]
                    )
                })
                .collect();
            let connected = hub
                .cli_json(&["cluster", "list"])?
                .as_array()
                .map_or(0, |l| l.iter().filter(|c| c["connected"] == true).count());
            anyhow::bail!(
                "{n} Healthy of {} rows, {connected} connected; not Healthy: {bad:?}",
                rows.len()
            );
        }
        Ok(Some(()))
    };
    wait_for(Duration::from_secs(120), "every cluster Healthy", || {
        all_healthy(&hub)
    })?;

    // The hub is gone for a while; clusters keep running what they have.
    hub.kill9();
    std::thread::sleep(Duration::from_secs(3));
    ensure!(
        clusters
            .configmaps_in("c000", "default")?
            .contains(&"web".to_string())
    );
    let restarted = Instant::now();
    hub.restart()?;
    // Right after the restart nobody has reported on this hub's sessions yet: no stale Healthy.
    let rows = hub.status()?;
    let stale: Vec<_> = rows
        .iter()
        .filter(|r| r["connected"] == false && r["health"] != "Unknown")
        .collect();
    ensure!(stale.is_empty(), "disconnected clusters shown as {stale:?}");
    wait_for(
        Duration::from_secs(120),
        "every cluster back and Healthy",
        || all_healthy(&hub),
    )?;
    let back = restarted.elapsed();
    let peak = hub.metric("flotilla_hub_admissions_peak_per_second")?;
    let delayed = hub.metric("flotilla_hub_admissions_delayed_total")?;
    println!(
        "{CLUSTERS} agents back and Healthy {back:?} after the hub restart; peak {peak} handshakes/s (limit {RATE}/s, burst {BURST}); {delayed} connections paced"
    );
    // A token bucket admits at most burst + rate in any one second (+1 for timer rounding).
    ensure!(peak <= (RATE + BURST + 1) as f64, "peak {peak}");
    Ok(())
}
