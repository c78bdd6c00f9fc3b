//! The same path against a real Kubernetes cluster. Runs only when `FLOTILLA_E2E_KUBECONFIG` names a
//! kubeconfig (every other suite uses kubesim, since no API server can run on CI machines): a hub
//! and an agent for that cluster converge an app into a throwaway namespace, checked with kubectl,
//! then deleting the app prunes it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, ensure};
use flotilla_e2e::{GitRepo, Hub, HubOptions, wait_for};

const T: Duration = Duration::from_secs(180);

fn kubectl(kubeconfig: &str, args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()?)
}

#[test]
fn a_real_cluster_converges_and_prunes() -> Result<()> {
    let Ok(kubeconfig) = std::env::var("FLOTILLA_E2E_KUBECONFIG") else {
        eprintln!("FLOTILLA_E2E_KUBECONFIG is not set: the real-cluster suite does not run");
        return Ok(());
    };
    let ns = format!("flotilla-e2e-{}", std::process::id());
    let hub = Hub::start(HubOptions::default())?;
    let token = hub.token(&[])?;
    let _agent = hub.agent_with_cluster("real", Some(&token), Path::new(&kubeconfig))?;
    hub.wait_connected("real", T)?;
    let dir = tempfile::tempdir()?;
    let repo = GitRepo::init(&dir.path().join("repo"))?;
    repo.write(
        "app/all.yaml",
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: settings, namespace: {ns}}}\ndata: {{cluster: \"${{cluster.name}}\"}}\n"
        ),
    )?;
    let v1 = repo.commit("v1")?;
    hub.apply_app(&format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: e2e}}\nspec:\n  source: {{repoURL: \"{}\", path: app}}\n  targets: {{clusters: [real]}}\n",
        repo.url()
    ))?;
    wait_for(T, "the app Healthy in the real cluster", || {
        let rows = hub.status()?;
        ensure!(
            rows.iter()
                .any(|r| r["revision"] == v1.as_str() && r["health"] == "Healthy"),
            "{rows:?}"
        );
        Ok(Some(()))
    })?;
    let out = kubectl(
        &kubeconfig,
        &[
            "get",
            "configmap",
            "settings",
            "-n",
            &ns,
            "-o",
            "jsonpath={.data.cluster}",
        ],
    )?;
    ensure!(String::from_utf8_lossy(&out.stdout) == "real", "{out:?}");

    let out = hub.cli(&["app", "delete", "e2e"])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(T, "the app pruned from the real cluster", || {
        let out = kubectl(&kubeconfig, &["get", "configmap", "settings", "-n", &ns])?;
        ensure!(!out.status.success(), "still there");
        Ok(Some(()))
    })?;
    let _ = kubectl(
        &kubeconfig,
        &["delete", "namespace", &ns, "--ignore-not-found"],
    );
    Ok(())
}
