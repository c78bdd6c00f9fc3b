//! The vertical slice: a commit in git reaches every targeted cluster through agents that pull over
//! mTLS, and `flotilla status` says truthfully where each cluster stands.

use std::time::Duration;

use anyhow::{Context, Result};
use flotilla_e2e::grpc::{agent_identity, channel};
use flotilla_e2e::{GitRepo, Hub, HubOptions, SimCluster, http_get, wait_for};
use flotilla_proto::v1::FetchBundleRequest;
use flotilla_proto::v1::agent_client::AgentClient;
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

const APP: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web}\ndata: {region: \"${cluster.labels.region}\", version: \"1\"}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: web, image: \"nginx:1.27\"}]}\n";

fn wait_all(hub: &Hub, rows: usize, revision: &str) -> Result<Vec<Value>> {
    wait_for(T, &format!("{rows} clusters Healthy at {revision}"), || {
        let status = hub.status()?;
        let done = status.len() == rows
            && status.iter().all(|r| {
                r["revision"] == revision && r["sync"] == "Synced" && r["health"] == "Healthy"
            });
        if done {
            return Ok(Some(status));
        }
        Err(anyhow::anyhow!(
            "status: {}",
            serde_json::to_string(&status)?
        ))
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn commits_reach_every_cluster_labels_move_apps_and_deletes_prune() -> Result<()> {
    let names = ["eu-1", "eu-2", "us-1"];
    let clusters = SimCluster::start_many(&names)?;
    let hub = Hub::start(HubOptions {
        http: true,
        ..HubOptions::default()
    })?;
    let token = hub.token(&["--uses", "3"])?;
    let mut agents = Vec::new();
    // A free loopback port for eu-1's metrics.
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string();
    for (name, region) in [("eu-1", "eu"), ("eu-2", "eu"), ("us-1", "us")] {
        let labels = format!("region={region}");
        let kubeconfig = clusters.kubeconfig_of(name);
        agents.push(if name == "eu-1" {
            hub.agent_with_metrics(name, Some(&token), &kubeconfig, &labels, &metrics_addr)?
        } else {
            hub.agent_with_cluster_labels(name, Some(&token), &kubeconfig, &labels)?
        });
    }
    for name in names {
        hub.wait_connected(name, T)?;
    }

    let dir = tempfile::tempdir()?;
    let repo = GitRepo::init(&dir.path().join("fleet"))?;
    repo.write("apps/web/app.yaml", APP)?;
    let first = repo.commit("web v1")?;
    hub.apply_app(&format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: web}}\nspec:\n  source: {{repoURL: \"{}\", path: apps/web}}\n  targets: {{selector: {{matchExpressions: [{{key: region, operator: Exists}}]}}}}\n",
        repo.url()
    ))?;
    let status = wait_all(&hub, 3, &first)?;
    for row in &status {
        for key in ["cluster", "app", "revision", "sync", "health"] {
            assert!(row.get(key).is_some(), "{key} missing in {row}");
        }
    }
    assert!(
        clusters
            .configmaps_in("us-1", "default")?
            .contains(&"web".to_string())
    );

    // A commit reaches all three.
    repo.write(
        "apps/web/app.yaml",
        &APP.replace("version: \"1\"", "version: \"2\""),
    )?;
    let second = repo.commit("web v2")?;
    let started = std::time::Instant::now();
    wait_all(&hub, 3, &second)?;
    println!("commit -> 3 clusters Healthy in {:?}", started.elapsed());

    // The hub's metrics tell the same story.
    let (code, metrics) = http_get(hub.http_addr.as_deref().context("http")?, "/metrics")?;
    assert_eq!(code, 200);
    for needle in [
        "flotilla_hub_connected_agents 3",
        "flotilla_hub_renders_total{result=\"ok\"}",
        "flotilla_hub_assignment_propagation_seconds_count",
        "flotilla_hub_bundle_bytes_served_total",
        "flotilla_hub_sync_reports_total{sync=\"Synced\",health=\"Healthy\"}",
    ] {
        assert!(
            metrics.contains(needle),
            "{needle} missing from:\n{metrics}"
        );
    }

    // And so do eu-1's agent metrics.
    let (code, agent_metrics) = http_get(&metrics_addr, "/metrics")?;
    assert_eq!(code, 200);
    for needle in [
        "flotilla_agent_hub_connected 1",
        "flotilla_agent_apps 1",
        "flotilla_agent_reconciles_total{result=\"ok\"}",
    ] {
        assert!(
            agent_metrics.contains(needle),
            "{needle} missing from:\n{agent_metrics}"
        );
    }

    // Cluster A's certificate cannot fetch cluster B's bundle.
    let app = hub.app("web")?;
    let digest_of = |cluster: &str| -> Result<String> {
        app["clusters"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["cluster"] == cluster)
            .and_then(|c| c["digest"].as_str())
            .map(str::to_string)
            .context("digest")
    };
    let (eu, us) = (digest_of("eu-1")?, digest_of("us-1")?);
    assert_ne!(eu, us, "regions render differently");
    let eu_identity = agent_identity(&agents[0])?;
    let mut client = AgentClient::new(channel(&hub, Some(eu_identity))?);
    let denied = client.fetch_bundle(FetchBundleRequest { digest: us }).await;
    let err = match denied {
        Ok(response) => response
            .into_inner()
            .message()
            .await
            .expect_err("B's bundle served to A"),
        Err(status) => status,
    };
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let mut own = client
        .fetch_bundle(FetchBundleRequest { digest: eu })
        .await?
        .into_inner();
    assert!(own.message().await?.is_some());

    // A label change moves the app off us-1: it is pruned there.
    let out = hub.cli(&["cluster", "label", "us-1", "region-"])?;
    assert!(out.status.success());
    wait_for(T, "web pruned from us-1", || {
        Ok((!clusters
            .configmaps_in("us-1", "default")?
            .contains(&"web".to_string()))
        .then_some(()))
    })?;
    wait_all(&hub, 2, &second)?;

    // Deleting the app prunes it everywhere, and its inventory with it.
    let out = hub.cli(&["app", "delete", "web"])?;
    assert!(out.status.success());
    for name in ["eu-1", "eu-2"] {
        wait_for(T, &format!("web pruned from {name}"), || {
            Ok((!clusters
                .configmaps_in(name, "default")?
                .contains(&"web".to_string()))
            .then_some(()))
        })?;
        wait_for(T, &format!("web's inventory gone from {name}"), || {
            let left = clusters.configmaps_in(name, "flotilla-system")?;
            anyhow::ensure!(
                !left.contains(&"flotilla-inventory-web".to_string()),
                "{left:?}"
            );
            Ok(Some(()))
        })?;
    }
    assert!(hub.status()?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_agent_shows_unknown_and_never_stale_healthy() -> Result<()> {
    let clusters = SimCluster::start_many(&["solo"])?;
    let hub = Hub::start(HubOptions::default())?;
    let token = hub.token(&[])?;
    let mut agent = hub.agent_with_cluster_labels(
        "solo",
        Some(&token),
        &clusters.kubeconfig_of("solo"),
        "region=eu",
    )?;
    hub.wait_connected("solo", T)?;
    let dir = tempfile::tempdir()?;
    let repo = GitRepo::init(&dir.path().join("fleet"))?;
    repo.write("app.yaml", APP)?;
    let rev = repo.commit("v1")?;
    hub.apply_app(&format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: web}}\nspec:\n  source: {{repoURL: \"{}\"}}\n  targets: {{clusters: [solo]}}\n",
        repo.url()
    ))?;
    wait_all(&hub, 1, &rev)?;
    agent.process.kill9();
    // Heartbeat 1 s: the hub drops the silent stream within 3 s.
    wait_for(Duration::from_secs(10), "solo Unknown", || {
        let status = hub.status()?;
        Ok((status.len() == 1
            && status[0]["health"] == "Unknown"
            && status[0]["sync"] == "Unknown")
            .then_some(()))
    })?;
    Ok(())
}

/// An app of 500 objects (50 Deployments) reports Healthy once the cluster has it all: the burst of
/// watch events after applying it must not freeze the agent's health reports (it once did).
#[test]
fn a_large_app_reports_healthy_when_the_cluster_is() -> Result<()> {
    let cluster = SimCluster::start()?;
    let hub = Hub::start(HubOptions::default())?;
    let token = hub.token(&[])?;
    // The agent's default resync: the harness's 2 s one would keep re-applying 500 objects.
    let _agent = hub.agent_with_args(
        "big-1",
        Some(&token),
        "",
        &[
            "--kubeconfig".into(),
            cluster.kubeconfig.display().to_string(),
        ],
    )?;
    let dir = tempfile::tempdir()?;
    let repo = GitRepo::init(&dir.path().join("repo"))?;
    let mut manifests = String::new();
    for i in 0..450 {
        manifests.push_str(&format!(
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm-{i}}}\ndata: {{k: \"{i}\"}}\n"
        ));
    }
    for i in 0..50 {
        manifests.push_str(&format!(
            "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web-{i}}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: web-{i}}}}}\n  template:\n    metadata: {{labels: {{app: web-{i}}}}}\n    spec: {{containers: [{{name: web, image: \"nginx:1.27\"}}]}}\n"
        ));
    }
    repo.write("big/all.yaml", &manifests)?;
    let rev = repo.commit("big")?;
    hub.apply_app(&format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: big}}\nspec:\n  source: {{repoURL: \"{}\", path: big}}\n  targets: {{clusters: [big-1]}}\n",
        repo.url()
    ))?;
    wait_for(Duration::from_secs(60), "500 objects Healthy", || {
        let rows = hub.status()?;
        anyhow::ensure!(
            rows.len() == 1
                && rows[0]["revision"] == rev.as_str()
                && rows[0]["health"] == "Healthy",
            "{rows:?}"
        );
        Ok(Some(()))
    })?;
    Ok(())
}
