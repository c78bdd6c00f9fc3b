//! 200 clusters: agents in-process against in-process kubesim clusters, real gRPC over mTLS to the
//! real hub binary, registering at once and converging to a commit within the test's budget.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use flotilla_e2e::{GitRepo, Hub, HubOptions, InProcessAgents, SimCluster, wait_for};

const CLUSTERS: usize = 200;

#[test]
fn two_hundred_clusters_register_at_once_and_converge_on_a_commit() -> Result<()> {
    let names: Vec<String> = (0..CLUSTERS).map(|i| format!("c{i:03}")).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let clusters = SimCluster::start_many(&name_refs)?;
    let hub = Hub::start(HubOptions {
        poll_interval: "500ms".into(),
        heartbeat_interval: "5s".into(),
        ..HubOptions::default()
    })?;
    let token = hub.token(&["--uses", &CLUSTERS.to_string()])?;
    let dir = tempfile::tempdir()?;
    let _agents = InProcessAgents::start(&hub, &clusters, &names, &token, dir.path())?;
    let started = Instant::now();
    hub.wait_all_connected(CLUSTERS, Duration::from_secs(120))?;
    println!(
        "{CLUSTERS} agents registered and connected in {:?}",
        started.elapsed()
    );

    let repo = GitRepo::init(&dir.path().join("fleet"))?;
    let app = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web}\ndata: {region: \"${cluster.labels.region}\", v: \"1\"}\n";
    repo.write("web/app.yaml", app)?;
    let first = repo.commit("v1")?;
    hub.apply_app(&format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: web}}\nspec:\n  source: {{repoURL: \"{}\", path: web}}\n  targets: {{selector: {{matchExpressions: [{{key: region, operator: Exists}}]}}}}\n",
        repo.url()
    ))?;
    let converged = |revision: &str| {
        wait_for(
            Duration::from_secs(120),
            &format!("{CLUSTERS} clusters at {revision}"),
            || {
                let status = hub.status()?;
                let done = status
                    .iter()
                    .filter(|r| {
                        r["revision"] == revision
                            && r["sync"] == "Synced"
                            && r["health"] == "Healthy"
                    })
                    .count();
                ensure!(done == CLUSTERS, "{done} of {CLUSTERS} at {revision}");
                Ok(Some(()))
            },
        )
    };
    converged(&first)?;
    repo.write("web/app.yaml", &app.replace("v: \"1\"", "v: \"2\""))?;
    let second = repo.commit("v2")?;
    let t = Instant::now();
    converged(&second)?;
    println!(
        "commit -> {CLUSTERS} clusters applied and Healthy in {:?}",
        t.elapsed()
    );
    Ok(())
}
