//! Agents given several hub addresses: the first that answers serves them, and when their hub is
//! gone they move to another address by themselves (the replicas here are two hubs on copies of
//! one data directory, as after a restore elsewhere; issue 25 makes them live replicas).

use std::process::Command;
use std::time::Duration;

use anyhow::{Result, ensure};
use flotilla_e2e::{Hub, HubOptions};

const T: Duration = Duration::from_secs(60);

#[test]
fn an_agent_uses_the_address_that_answers_and_moves_when_its_hub_is_gone() -> Result<()> {
    let mut a = Hub::start(HubOptions::default())?;
    let token = a.token(&[])?;
    let mut agent = a.agent("eu-1", Some(&token), "")?;
    a.wait_connected("eu-1", T)?;

    // A second hub on a copy of the first one's data: same CA, same clusters.
    a.process.terminate();
    a.process.wait_exit(Duration::from_secs(10))?;
    let copy = tempfile::tempdir()?;
    let cp = Command::new("cp")
        .arg("-a")
        .arg(a.data_dir())
        .arg(copy.path().join("hub"))
        .output()?;
    ensure!(
        cp.status.success(),
        "{}",
        String::from_utf8_lossy(&cp.stderr)
    );
    a.restart()?;
    let b = Hub::serve_existing(copy, HubOptions::default())?;

    // Nothing listens on port 1: the agent goes on to the next address and stays there.
    let hubs = format!("https://127.0.0.1:1,{},{}", a.url, b.url);
    agent.restart(&hubs, &a.pki("ca.pem"), None)?;
    a.wait_connected("eu-1", T)?;
    std::thread::sleep(Duration::from_secs(2));
    let on_b = b.cluster("eu-1")?.is_some_and(|c| c["connected"] == true);
    ensure!(!on_b, "the agent left a hub that answers");

    // Its hub gone, the agent is back within its reconnect backoff on the other one.
    a.kill9();
    b.wait_connected("eu-1", T)?;
    // Said each time: past port 1 at start, then to the second hub.
    let log = agent.process.log_text();
    ensure!(
        log.matches("moved to another hub address").count() >= 2,
        "the agent says where it went:\n{log}"
    );
    Ok(())
}
