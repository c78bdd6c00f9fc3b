//! Offline autonomy: an agent restarted while the hub is down keeps enforcing the apps it knows,
//! and reconnects by itself when the hub returns.

use std::time::Duration;

use anyhow::Result;
use flotilla_e2e::{Hub, HubOptions, SimCluster, agent_apply, wait_for};

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
