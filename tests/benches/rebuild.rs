//! Rebuild time: a cluster running a 1,000-object app is lost; `flotilla cluster rebuild` + a new
//! agent in an empty kubesim cluster with 5 ms of API latency; timed from the new registration to
//! every app Healthy, as the hub records it (`cluster get` → `last_recovery_ms`).
//! Run: `cargo bench -p flotilla-e2e --bench rebuild` (FLOTILLA_BENCH_OBJECTS to change the size).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use flotilla_e2e::{Agent, GitRepo, Hub, HubOptions, SimCluster, wait_for};
use kubesim::cluster::Faults;

fn slow_cluster(name: &str) -> SimCluster {
    let sim = SimCluster::start_many(&[name]).unwrap();
    sim.sim.cluster(name).unwrap().set_faults(Faults {
        latency_ms: std::env::var("FLOTILLA_BENCH_LATENCY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5),
        ..Faults::default()
    });
    sim
}

/// An agent for `edge` with the default resync (the harness's 2 s resync would keep re-applying
/// 1,000 objects at 5 ms each, which is not what a rebuild costs).
fn agent(hub: &Hub, token: &str, cluster: &SimCluster, labels: &str) -> Agent {
    hub.agent_with_args(
        "edge",
        Some(token),
        labels,
        &[
            "--kubeconfig".into(),
            cluster.kubeconfig.display().to_string(),
        ],
    )
    .unwrap()
}

fn main() {
    let objects: usize = std::env::var("FLOTILLA_BENCH_OBJECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let hub = Hub::start(HubOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let repo = GitRepo::init(&dir.path().join("repo")).unwrap();
    // A realistic mix: namespaces first, then config, then workloads.
    let mut manifests = String::new();
    for ns in 0..10 {
        manifests.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: team-{ns}}}\n"
        ));
    }
    for i in 0..objects.saturating_sub(10 + objects / 10) {
        manifests.push_str(&format!(
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm-{i}, namespace: team-{}}}\ndata: {{k: \"{i}\"}}\n",
            i % 10
        ));
    }
    for i in 0..objects / 10 {
        manifests.push_str(&format!(
            "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web-{i}, namespace: team-{}}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: web-{i}}}}}\n  template:\n    metadata: {{labels: {{app: web-{i}}}}}\n    spec: {{containers: [{{name: web, image: \"nginx:1.27\"}}]}}\n",
            i % 10
        ));
    }
    repo.write("big/all.yaml", &manifests).unwrap();
    repo.commit("big").unwrap();
    hub.apply_app(&format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: big}}\nspec:\n  source: {{repoURL: \"{}\", path: big}}\n  targets: {{clusters: [edge]}}\n",
        repo.url()
    ))
    .unwrap();

    let lost = slow_cluster("edge");
    let token = hub.token(&[]).unwrap();
    let mut old_agent = agent(&hub, &token, &lost, "site=a");
    let healthy = || {
        wait_for(Duration::from_secs(120), "edge Healthy", || {
            let rows = hub.status()?;
            anyhow::ensure!(
                rows.len() == 1 && rows[0]["health"] == "Healthy" && rows[0]["sync"] == "Synced",
                "{rows:?}"
            );
            Ok(Some(()))
        })
        .unwrap()
    };
    let t = Instant::now();
    healthy();
    println!("first deployment of {objects} objects: {:?}", t.elapsed());

    old_agent.process.kill9();
    let fresh = slow_cluster("edge");
    let rebuilt = hub.cli_json(&["cluster", "rebuild", "edge"]).unwrap();
    let new_token = rebuilt["token"].as_str().unwrap().to_string();
    let t = Instant::now();
    let _new = agent(&hub, &new_token, &fresh, "");
    let cluster = wait_for(Duration::from_secs(300), "recovery recorded", || {
        let c = hub.cli_json(&["cluster", "get", "edge"])?;
        anyhow::ensure!(
            c["last_recovery_ms"].as_i64().is_some(),
            "{c} {:?}",
            hub.status()?
        );
        Ok(Some(c))
    })
    .unwrap();
    println!(
        "rebuild of a {objects}-object cluster at 5 ms API latency: {} ms registration -> every app Healthy (hub's record); {:?} from agent start",
        cluster["last_recovery_ms"],
        t.elapsed()
    );
}
