//! Offline autonomy: an agent restarted while the hub is down keeps enforcing the apps it knows,
//! and reconnects by itself when the hub returns.

use std::time::Duration;

use anyhow::Result;
use flotilla_e2e::{Hub, HubOptions, SimCluster, agent_apply, wait_for};

const T: Duration = Duration::from_secs(60);

#[test]
fn an_agent_without_its_hub_keeps_healing_its_cached_apps_and_reconnects() -> Result<()> {
    let cluster = SimCluster::start()?;
    let mut hub = Hub::start(HubOptions::default())?;
    let token = hub.token(&[])?;
    let mut agent = hub.agent_with_cluster("edge-1", Some(&token), &cluster.kubeconfig)?;
    hub.wait_connected("edge-1", Duration::from_secs(20))?;
    agent.process.kill9();

    // The app the agent knows (cached in its data directory by a previous apply).
    let bundle = tempfile::tempdir()?;
    std::fs::write(
        bundle.path().join("cm.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: edge-settings}\ndata: {mode: safe}\n",
    )?;
    let out = agent_apply(&cluster.kubeconfig, &agent.data_dir, "edge", bundle.path())?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The hub goes away; the agent restarts without it.
    hub.kill9();
    agent.restart_with(
        &hub.url,
        &hub.pki("ca.pem"),
        None,
        Some(&cluster.kubeconfig),
    )?;
    std::thread::sleep(Duration::from_secs(1));
    cluster.delete_configmap("default", "edge-settings")?;
    wait_for(
        Duration::from_secs(10),
        "the deleted ConfigMap to be healed offline",
        || {
            Ok(cluster
                .configmaps("default")?
                .contains(&"edge-settings".to_string())
                .then_some(()))
        },
    )?;
    assert!(agent.process.running(), "{}", agent.process.log_text());

    // The hub returns: the agent reconnects without operator action.
    hub.restart()?;
    hub.wait_connected("edge-1", Duration::from_secs(45))?;
    Ok(())
}

/// An in-cluster agent (identity in a Secret) rescheduled onto an empty disk while the hub is down:
/// its apps' last bundles are in Secrets beside its identity, sealed, and it keeps enforcing them.
#[test]
fn a_rescheduled_agent_enforces_its_bundles_from_secrets_while_the_hub_is_down() -> Result<()> {
    use flotilla_e2e::{Agent, GitRepo, cluster_args};
    let sim = SimCluster::start_many(&["eu-1"])?;
    let mut hub = Hub::start(HubOptions {
        poll_interval: "300ms".into(),
        ..HubOptions::default()
    })?;
    let dir = tempfile::tempdir()?;
    let repo = GitRepo::init(&dir.path().join("repo"))?;
    repo.write(
        "web/app.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web}\ndata: {v: one}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: web}\nstringData: {password: hunter2-canary}\n",
    )?;
    repo.commit("first")?;
    hub.apply_app(&format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: web}}\nspec:\n  source: {{repoURL: \"{}\", path: web}}\n  targets: {{clusters: [eu-1]}}\n",
        repo.url()
    ))?;
    let token = hub.token(&["--cluster", "eu-1"])?;
    let mut extra = cluster_args(&sim.kubeconfig_of("eu-1"));
    extra.extend([
        "--identity-secret".into(),
        "flotilla-system/flotilla-agent-identity".into(),
    ]);
    let ca = hub.pki("ca.pem");
    let mut first = Agent::start_with(
        &hub.url,
        &ca,
        &dir.path().join("pod-1"),
        Some("eu-1"),
        Some(&token),
        "",
        &extra,
    )?;
    let present = || -> Result<Option<()>> {
        Ok(sim
            .object("eu-1", "ConfigMap", "default", "web")?
            .map(|_| ()))
    };
    wait_for(T, "web applied", present)?;
    let mirrored = wait_for(T, "the bundle kept in a Secret", || {
        sim.object("eu-1", "Secret", "flotilla-system", "flotilla-bundle-web")
    })?;
    let text = mirrored.to_string();
    for secret in ["hunter2-canary", "aHVudGVyMi1jYW5hcnk"] {
        anyhow::ensure!(!text.contains(secret), "{secret} readable in {text}");
    }

    // The hub goes away, then the pod: its replacement starts on an empty disk.
    hub.kill9();
    first.process.kill9();
    let second = Agent::start_with(
        &hub.url,
        &ca,
        &dir.path().join("pod-2"),
        None,
        None,
        "",
        &extra,
    )?;
    wait_for(T, "the bundles restored", || {
        let log = second.process.log_text();
        Ok(log
            .contains("bundles restored from their Secrets")
            .then_some(()))
    })?;
    sim.kubectl("eu-1", &["delete", "configmap", "web"], "")?;
    wait_for(T, "web healed by the rescheduled agent, hub down", present)
        .inspect_err(|_| eprintln!("agent log:\n{}", second.process.log_text()))?;
    Ok(())
}
