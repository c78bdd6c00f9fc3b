//! Hub backup and restore through the real binaries: back up online, lose the data directory,
//! restore; agents reconnect with the certificates they hold, nothing is re-applied, and a
//! revoked cluster stays revoked.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use flotilla_e2e::grpc::{agent_identity, session_refusal};
use flotilla_e2e::{GitRepo, Hub, HubOptions, SimCluster, bin, wait_for};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);
const PASSPHRASE: &str = "a long enough passphrase";

/// name → resourceVersion of every object the app manages, as the cluster's API server has them.
fn versions(sim: &SimCluster, cluster: &str) -> Result<Vec<(String, Value)>> {
    let mut out = Vec::new();
    for kind in ["ConfigMap", "Deployment"] {
        for o in sim.objects(cluster, kind, "default")? {
            if o["metadata"]["labels"]
                .get("app.kubernetes.io/managed-by")
                .is_some()
                || o["metadata"]["name"] == "web"
            {
                out.push((
                    format!("{kind}/{}", o["metadata"]["name"]),
                    o["metadata"]["resourceVersion"].clone(),
                ));
            }
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_brings_back_the_hub_without_touching_the_fleet() -> Result<()> {
    let sim = SimCluster::start_many(&["a", "b"])?;
    let mut hub = Hub::start(HubOptions::default())?;
    let token = hub.token(&["--uses", "3"])?;
    let _a =
        hub.agent_with_cluster_labels("a", Some(&token), &sim.kubeconfig_of("a"), "env=prod")?;
    let _b =
        hub.agent_with_cluster_labels("b", Some(&token), &sim.kubeconfig_of("b"), "env=prod")?;
    let gone = hub.agent("gone", Some(&token), "")?;
    hub.wait_connected("gone", T)?;
    let gone_identity = agent_identity(&gone)?;
    let out = hub.cli(&["cluster", "deregister", "gone"])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir()?;
    let repo = GitRepo::init(&dir.path().join("repo"))?;
    repo.write(
        "web/app.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web}\ndata: {v: \"1\"}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 1\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: web, image: \"nginx:1.27\"}]}\n",
    )?;
    let v1 = repo.commit("v1")?;
    hub.apply_app(&format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: web}}\nspec:\n  source: {{repoURL: \"{}\", path: web}}\n  targets: {{selector: {{matchLabels: {{env: prod}}}}}}\n",
        repo.url()
    ))?;
    let all_healthy = |hub: &Hub| {
        wait_for(T, "a and b Healthy at v1", || {
            let rows = hub.status()?;
            ensure!(
                rows.len() == 2
                    && rows.iter().all(|r| r["revision"] == v1.as_str()
                        && r["health"] == "Healthy"
                        && r["sync"] == "Synced"),
                "{rows:?}"
            );
            Ok(Some(()))
        })
    };
    all_healthy(&hub)?;
    let before: Vec<_> = ["a", "b"]
        .iter()
        .map(|c| versions(&sim, c))
        .collect::<Result<_>>()?;
    ensure!(before.iter().all(|v| v.len() == 2), "{before:?}");

    // Back up online; the file holds no private key in clear and no passphrase.
    let pass_file = dir.path().join("passphrase");
    std::fs::write(&pass_file, format!("{PASSPHRASE}\n"))?;
    let backup = dir.path().join("hub.backup");
    hub.backup(&backup, &pass_file)?;
    let text = std::fs::read_to_string(&backup)?;
    ensure!(!text.contains("PRIVATE KEY") && !text.contains(PASSPHRASE));
    ensure!(!text.contains(&token), "a token secret is in the backup");

    // The hub is lost.
    hub.kill9();
    let data_dir = hub.data_dir();
    std::fs::remove_dir_all(&data_dir)?;

    // A wrong passphrase restores nothing and says why.
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "not the passphrase at all")?;
    let restore = |pass: &std::path::Path| {
        std::process::Command::new(bin("flotilla-hub"))
            .args(["restore", "--data-dir"])
            .arg(&data_dir)
            .arg("--from")
            .arg(&backup)
            .arg("--passphrase-file")
            .arg(pass)
            .output()
    };
    let out = restore(&wrong)?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("wrong passphrase"),
        "{err}"
    );
    ensure!(!data_dir.exists(), "a failed restore left a data directory");
    let out = restore(&pass_file)?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = restore(&pass_file)?;
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("not empty"),
        "restoring over a hub must refuse"
    );

    // Serve the restored directory on the same address: agents come back on their own.
    hub.restart()?;
    for name in ["a", "b"] {
        hub.wait_connected(name, T)?;
    }
    all_healthy(&hub)?;
    // Give any re-apply the time to happen before looking for it.
    std::thread::sleep(Duration::from_secs(3));
    let after: Vec<_> = ["a", "b"]
        .iter()
        .map(|c| versions(&sim, c))
        .collect::<Result<_>>()?;
    ensure!(
        before == after,
        "objects were re-applied after the restore: {before:?} -> {after:?}"
    );

    // Revocations hold; the audit log came back and records the backup.
    ensure!(hub.cluster("gone")?.is_none());
    let err = session_refusal(&hub, gone_identity).await?;
    ensure!(err.code() == tonic::Code::Unauthenticated, "{err}");
    let audit = hub.cli_json(&["audit"])?;
    let actions: Vec<_> = audit
        .as_array()
        .context("audit list")?
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    ensure!(
        actions.contains(&"cluster.deregister") && actions.contains(&"app.apply"),
        "{actions:?}"
    );
    // New audit entries continue the restored numbering.
    hub.token(&[])?;
    let audit = hub.cli_json(&["audit"])?;
    let seqs: Vec<u64> = audit
        .as_array()
        .context("audit list")?
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .collect();
    ensure!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    Ok(())
}
